"""Pixel-space inputs → conditioning latents: start/end images, masked videos, control videos.

Conventions (see the fact sheet §6–7): videos are [1,3,F,H,W]; user masks use 1 = generate,
0 = keep; the transformer's mask channel is (1 − mask) resized to the latent grid × 0.7125.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from .errors import UnsupportedRequestError


def to_rgb(frames: torch.Tensor, what: str = "image") -> tuple[torch.Tensor, str | None]:
    """[..., C] images with 1-4 channels → [..., 3]: alpha dropped, gray repeated; plus a note saying so."""
    channels = frames.shape[-1]
    if channels == 4:
        return frames[..., :3], f"{what} has an alpha channel (RGBA): the alpha is dropped, transparent areas keep " \
                                "their colour"
    if channels in (1, 2):
        label = "grayscale" if channels == 1 else "grayscale with alpha"
        return frames[..., :1].expand(*frames.shape[:-1], 3), f"{what} is {label}: its gray is repeated into RGB"
    return frames, None


def frames_to_video(frames: torch.Tensor, height: int, width: int, what: str = "video") -> torch.Tensor:
    """[F,H,W,C] (or one image [H,W,C]) float 0..1 → [1,3,F,height,width] float32, resized if needed.

    C is 3, or 4 (alpha dropped) or 1 (gray repeated), with a warning for the latter two.
    """
    frames = torch.as_tensor(frames)
    if frames.dim() == 3:
        frames = frames.unsqueeze(0)
    if frames.dim() == 4 and frames.shape[-1] in (1, 2, 4):
        frames, note = to_rgb(frames, what)
        warnings.warn(note, stacklevel=2)
    if frames.dim() != 4 or frames.shape[-1] != 3:
        raise UnsupportedRequestError(f"{what} must be [frames, height, width, 3] (or [height, width, 3]; RGBA and "
                                      f"grayscale are converted) with values 0..1; got shape {list(frames.shape)}")
    if frames.dtype == torch.uint8:
        frames = frames.float() / 255.0
    video = frames.float().permute(0, 3, 1, 2)  # F,3,H,W
    if video.shape[-2:] != (height, width):
        video = F.interpolate(video, size=(height, width), mode="bilinear", align_corners=False, antialias=True)
        video = video.clamp(0, 1)
    return video.permute(1, 0, 2, 3).unsqueeze(0).contiguous()


def mask_to_video_mask(mask: torch.Tensor, num_frames: int, height: int, width: int) -> torch.Tensor:
    """[F,H,W] or [H,W] mask (1 = generate) → binarised [1,1,F,height,width] float32 (nearest resize)."""
    mask = torch.as_tensor(mask).float()
    if mask.dim() == 2:
        mask = mask.unsqueeze(0)
    if mask.dim() != 3:
        raise UnsupportedRequestError(f"mask must be [frames, height, width] or [height, width] with 1 = generate; "
                                      f"got shape {list(mask.shape)}")
    if mask.shape[0] == 1:
        mask = mask.expand(num_frames, -1, -1)
    if mask.shape[0] < num_frames:
        raise UnsupportedRequestError(f"mask has {mask.shape[0]} frames but the video has {num_frames}")
    mask = mask[:num_frames].unsqueeze(1)
    if mask.shape[-2:] != (height, width):
        mask = F.interpolate(mask, size=(height, width), mode="nearest")
    return (mask >= 0.5).float().permute(1, 0, 2, 3).unsqueeze(0)


def keyframe_inputs(start_image, end_image, num_frames: int, height: int, width: int):
    """Video and mask for first/last-frame conditioning: known frames 0 (and F−1), the rest generated.

    As the original util does, the start image is tiled over every frame and the mask marks what to generate.
    """
    video = torch.zeros(1, 3, num_frames, height, width)
    mask = torch.ones(1, 1, num_frames, height, width)
    if start_image is not None:
        video[:] = frames_to_video(start_image, height, width, "start_image")
        mask[:, :, 0] = 0
    if end_image is not None:
        video[:, :, -1:] = frames_to_video(end_image, height, width, "end_image")
        mask[:, :, -1] = 0
    return video, mask


def masked_video(video01: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Map to [-1,1] and set the pixels to generate to exactly −1."""
    pixels = video01 * 2 - 1
    return torch.where(mask.expand_as(pixels) >= 0.5, torch.full_like(pixels, -1.0), pixels)


def add_reference_noise(pixels: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Add noise (already scaled) to every pixel that is not exactly −1, as the original does."""
    noise = noise.to(pixels)
    return pixels + torch.where(pixels == -1, torch.zeros_like(noise), noise)


def resize_mask_to_latents(known: torch.Tensor, latent_shape) -> torch.Tensor:
    """[1,1,F,H,W] known-mask → [1,1,T,h,w]: frame 0 alone, frames 1.. onto T−1 frames (trilinear)."""
    t, h, w = latent_shape[-3:]
    first = F.interpolate(known[:, :, :1], size=(1, h, w), mode="trilinear", align_corners=False)
    if t == 1:
        return first
    rest = F.interpolate(known[:, :, 1:], size=(t - 1, h, w), mode="trilinear", align_corners=False)
    return torch.cat([first, rest], dim=2)
