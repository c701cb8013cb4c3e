"""ComfyUI inputs made fit where they enter: RGB channels, usable sizes, and notes the user sees.

Every change made to an input is said twice: under the node (its returned text) and in the console,
so it is seen whether the page shows node text or not. Inputs that cannot give what was meant are
refused here with the node's input names.
"""
from __future__ import annotations

import torch

from ..easyanimate_core.conditioning import to_rgb
from ..easyanimate_core.errors import UnsupportedRequestError
from .comfy_bridge import log

MIN_IMAGE_SIDE = 16  # the smallest video side; an image below it cannot be a frame or set an aspect ratio


def report(node: str, notes: list[str]) -> dict | None:
    """The node's UI text for `notes`, each also logged to the console as a warning."""
    for note in notes:
        log.warning("EasyAnimate %s: %s", node, note)
    return {"text": ("\n".join(notes),)} if notes else None


def rgb_images(images: torch.Tensor, name: str, notes: list[str]) -> torch.Tensor:
    """An IMAGE batch as [B,H,W,3]: alpha dropped, grayscale repeated, each with a note; other shapes refused."""
    if images.dim() == 3:
        images = images.unsqueeze(0)
    if images.dim() != 4:
        raise UnsupportedRequestError(f"{name} must be an IMAGE batch [frames, height, width, channels]; got shape "
                                      f"{list(images.shape)}")
    if images.shape[-1] in (1, 2, 3, 4):
        images, note = to_rgb(images, name)
        notes.extend([note] if note else [])
        return images
    raise UnsupportedRequestError(f"{name} has {images.shape[-1]} channels; connect an RGB, RGBA or grayscale IMAGE "
                                  "(for a mask, use the MASK input of EasyAnimate Video Inpaint)")


def check_image_size(images: torch.Tensor, name: str) -> None:
    """Refuse images too small to be a frame (a 1x1 image would silently become a flat-coloured video)."""
    height, width = images.shape[1], images.shape[2]
    if min(height, width) < MIN_IMAGE_SIDE:
        raise UnsupportedRequestError(
            f"{name} is only {width}x{height} pixels: too small to be a video frame or to set an aspect ratio "
            f"(at least {MIN_IMAGE_SIDE}x{MIN_IMAGE_SIDE}; the trained sizes are 256-1024 px). Connect the real "
            "image or video (a mask belongs in Video Inpaint's mask input).")


def image_input(images: torch.Tensor, name: str, notes: list[str]) -> torch.Tensor:
    """rgb_images + check_image_size: an IMAGE input ready for the core."""
    images = rgb_images(images, name, notes)
    check_image_size(images, name)
    return images
