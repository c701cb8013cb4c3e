"""Frames ↔ latents through the MagViT VAE, without a whole pipeline (used by the pipeline and by nodes)."""
from __future__ import annotations

import torch

from .conditioning import frames_to_video


@torch.inference_mode()
def encode_frames(vae, frames: torch.Tensor, height: int, width: int, device=None):
    """[F,H,W,3] float 0..1 → the VAE posterior (unscaled mean/std), frames resized to height×width."""
    device = torch.device(device) if device is not None else _device_of(vae)
    pixels = frames_to_video(frames, height, width, "video") * 2 - 1
    return vae.encode(pixels.to(device, vae.dtype))


@torch.inference_mode()
def decode_latents(vae, latents: torch.Tensor, device=None) -> torch.Tensor:
    """Scaled latents [1,16,T,h,w] → frames [F,H,W,3] float32 0..1 on CPU."""
    device = torch.device(device) if device is not None else _device_of(vae)
    video = vae.decode(latents.to(device, vae.dtype) / vae.scaling_factor)[0]
    # To the host in the VAE's dtype first, then in place: no full-size float32 copies on the device.
    video = video.cpu().float()
    video.clamp_(-1, 1).mul_(0.5).add_(0.5)
    return video.permute(1, 2, 3, 0).contiguous()


def _device_of(module) -> torch.device:
    return next(module.parameters()).device
