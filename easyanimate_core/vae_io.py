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
    """Scaled latents [1,16,T,h,w] → frames [F,H,W,3] float32 0..1 on CPU.

    Decoded one causal chunk at a time straight into the output, so besides the frames themselves
    only one chunk is held (the memory of a long video's decode does not grow with its length).
    """
    device = torch.device(device) if device is not None else _device_of(vae)
    _, _, t, h, w = latents.shape
    c = vae.spatial_compression
    out = torch.empty((t - 1) * vae.temporal_compression + 1, h * c, w * c, 3)
    filled = 0
    for piece in vae.decode_pieces(latents.to(device, vae.dtype) / vae.scaling_factor):
        # To the host in the VAE's dtype first, then in place: no full-size float32 copies on the device.
        piece = piece[0].cpu().float()
        piece.clamp_(-1, 1).mul_(0.5).add_(0.5)
        out[filled:filled + piece.shape[1]] = piece.permute(1, 2, 3, 0)
        filled += piece.shape[1]
    if filled != out.shape[0]:
        raise RuntimeError(f"the VAE decoded {filled} frames from {t} latent frames, expected {out.shape[0]}")
    return out


def _device_of(module) -> torch.device:
    return next(module.parameters()).device
