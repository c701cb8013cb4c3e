"""Latent → RGB preview factors fitted to a VAE (easyanimate_core.latent_rgb)."""
import torch
import torch.nn.functional as F
from torch import nn

from easyanimate_core.latent_rgb import _smooth_colour_images, fit_latent_rgb_factors
from easyanimate_core.models.vae import DiagonalGaussian


class LinearColourEncoder(nn.Module):
    """A known answer: latents = mix @ (8x8 mean colour) + offset, so the fit must invert it exactly."""

    scaling_factor = 0.7125

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.mix = nn.Parameter(torch.randn(16, 3, generator=g), requires_grad=False)
        self.offset = nn.Parameter(torch.randn(16, generator=g), requires_grad=False)

    @property
    def dtype(self):
        return torch.float32

    def encode(self, video):
        colour = F.avg_pool3d(video, (1, 8, 8))                     # [B, 3, 1, h, w]
        mean = torch.einsum("lc,bcthw->blthw", self.mix, colour) + self.offset[None, :, None, None, None]
        return DiagonalGaussian(torch.cat([mean, torch.full_like(mean, -30.0)], dim=1))


def test_a_linear_encoder_is_inverted_exactly():
    vae = LinearColourEncoder()
    factors, bias = fit_latent_rgb_factors(vae, "cpu")
    images = _smooth_colour_images(3, 64, seed=7)
    with torch.inference_mode():
        latents = vae.encode(images[:, :, None]).mode()[:, :, 0] * vae.scaling_factor
    rgb = torch.einsum("bchw,cr->brhw", latents, torch.tensor(factors)) + torch.tensor(bias)[None, :, None, None]
    assert (rgb - F.avg_pool2d(images, 8)).abs().max() < 1e-4


def test_fitted_factors_for_the_tiny_vae_beat_the_mean_colour_on_unseen_images(tiny_pipeline):
    vae = tiny_pipeline("t2v").vae
    factors, bias = fit_latent_rgb_factors(vae)
    assert len(factors) == 16 and all(len(row) == 3 for row in factors) and len(bias) == 3
    assert (factors, bias) == fit_latent_rgb_factors(vae)  # deterministic

    images = _smooth_colour_images(6, 64, seed=123)  # not the fitting images
    with torch.inference_mode():
        latents = vae.encode(images[:, :, None]).mode()[:, :, 0] * vae.scaling_factor
    predicted = torch.einsum("bchw,cr->brhw", latents, torch.tensor(factors)) + torch.tensor(bias)[None, :, None, None]
    target = F.avg_pool2d(images, 8)
    error = (predicted - target).pow(2).mean()
    baseline = (target - target.mean(dim=(0, 2, 3), keepdim=True)).pow(2).mean()
    # a random tiny VAE keeps little colour linearly; a trained one keeps most of it
    assert error < baseline
