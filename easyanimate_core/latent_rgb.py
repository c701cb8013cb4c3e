"""A linear latent → RGB map for cheap previews, fitted to a model folder's own VAE.

Preview tools (ComfyUI's "latent2rgb" previews among them) show `latent @ factors + bias` as a
colour image in [-1, 1]. No published factors exist for the V5 MagViT VAE, so they are fitted here
by least squares: a few smooth random colour images are encoded (one frame each) and every latent
pixel is regressed onto the mean colour of the 8x8 pixel patch it encodes. The fit takes a few
encoder calls on 64x64 images and is exact for whatever VAE is loaded.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

FIT_IMAGES = 12
FIT_SIZE = 64
SPATIAL_STRIDE = 8


def _smooth_colour_images(count: int, size: int, seed: int) -> torch.Tensor:
    """[count, 3, size, size] in [-1, 1]: low-frequency colour fields, so each 8x8 patch is nearly flat."""
    generator = torch.Generator("cpu").manual_seed(seed)
    coarse = torch.rand(count, 3, 4, 4, generator=generator) * 2 - 1
    return F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=True).clamp(-1, 1)


@torch.inference_mode()
def fit_latent_rgb_factors(vae, device=None, seed: int = 0) -> tuple[list[list[float]], list[float]]:
    """(factors [16][3], bias [3]) such that scaled latents @ factors + bias ≈ the RGB (-1..1) they encode.

    Latents are taken as the sampler sees them: the posterior mode times `vae.scaling_factor`.
    """
    device = torch.device(device) if device is not None else next(vae.parameters()).device
    images = _smooth_colour_images(FIT_IMAGES, FIT_SIZE, seed)
    latents = vae.encode(images[:, :, None].to(device, vae.dtype)).mode().float().cpu() * vae.scaling_factor
    targets = F.avg_pool2d(images, SPATIAL_STRIDE)                       # [N, 3, h, w]
    x = latents[:, :, 0].permute(0, 2, 3, 1).reshape(-1, latents.shape[1])  # [N*h*w, 16]
    y = targets.permute(0, 2, 3, 1).reshape(-1, 3)
    design = torch.cat([x, torch.ones(x.shape[0], 1)], dim=1).double()
    solution = torch.linalg.lstsq(design, y.double()).solution.float()  # [17, 3]
    return solution[:-1].tolist(), solution[-1].tolist()
