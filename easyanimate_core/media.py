"""Reading images/videos from disk and writing mp4 files (imageio + Pillow), for the CLI."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

VIDEO_SUFFIXES = {".mp4", ".mov", ".mkv", ".webm", ".avi", ".gif"}


def read_image(path: str | Path) -> torch.Tensor:
    """An image file → [H,W,3] float32 0..1."""
    from PIL import Image

    with Image.open(path) as img:
        return torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0)


def read_frames(path: str | Path, max_frames: int | None = None) -> torch.Tensor:
    """A video file (or a single image) → [F,H,W,3] float32 0..1."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"input file {path} does not exist")
    if path.suffix.lower() not in VIDEO_SUFFIXES:
        return read_image(path).unsqueeze(0)
    import imageio.v2 as imageio

    frames = []
    with imageio.get_reader(str(path)) as reader:
        for frame in reader:
            frames.append(np.asarray(frame)[..., :3])
            if max_frames is not None and len(frames) >= max_frames:
                break
    if not frames:
        raise ValueError(f"{path} has no frames")
    return torch.from_numpy(np.stack(frames).astype(np.float32) / 255.0)


def write_video(path: str | Path, frames: torch.Tensor, fps: float = 8.0) -> Path:
    """[F,H,W,3] float 0..1 → an h264 mp4 (or a PNG when there is a single frame and the suffix says so)."""
    import imageio.v2 as imageio

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = (frames.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    if path.suffix.lower() in {".png", ".jpg", ".jpeg", ".webp"}:
        imageio.imwrite(str(path), data[0])
        return path
    imageio.mimwrite(str(path), list(data), fps=fps, codec="libx264", quality=8, macro_block_size=1,
                     pixelformat="yuv420p")
    return path
