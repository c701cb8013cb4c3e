"""The example inputs the shipped workflows load, and copying them into ComfyUI's input/ folder.

install.py and the pack's import (each ComfyUI start) call copy_missing, so a workflow dragged onto the
page finds its image/video/mask at once. Files already in input/ are never overwritten (a user's own
file under the same name wins). The files are rendered by render.py.
"""
from __future__ import annotations

import shutil
from pathlib import Path

FOLDER = Path(__file__).resolve().parent
EXAMPLE_INPUTS = ("start_frame.png", "end_frame.png", "input_video.mp4", "pose_video.mp4", "mask.png")


def copy_missing(input_dir: str | Path) -> list[str]:
    """Copy the example inputs that input_dir lacks; returns the names copied."""
    input_dir = Path(input_dir)
    input_dir.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in EXAMPLE_INPUTS:
        if not (input_dir / name).exists():
            shutil.copyfile(FOLDER / name, input_dir / name)
            copied.append(name)
    return copied
