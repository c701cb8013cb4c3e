"""Run by ComfyUI-Manager after `pip install -r requirements.txt` (or by hand: `python install.py`).

Checks that the pack's dependencies import, creates ComfyUI/models/EasyAnimate/ with the download
command of each official model (the loader also downloads them on first use), and copies the example
inputs the shipped workflows load into ComfyUI/input/. It installs no package itself.
"""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

PACK_DIR = Path(os.path.abspath(__file__)).parent  # not resolve(): keep a symlinked custom_nodes path
# import name -> pip name
REQUIRED = {"torch": "torch", "diffusers": "diffusers", "transformers": "transformers", "safetensors": "safetensors",
            "einops": "einops", "cv2": "opencv-python", "imageio": "imageio", "imageio_ffmpeg": "imageio-ffmpeg",
            "sentencepiece": "sentencepiece", "google.protobuf": "protobuf", "PIL": "Pillow"}


def missing_packages() -> list[str]:
    missing = []
    for module, package in REQUIRED.items():
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:
            found = False
        if not found:
            missing.append(package)
    return missing


def models_folder() -> Path | None:
    """ComfyUI/models/EasyAnimate when the pack sits in ComfyUI/custom_nodes/."""
    if PACK_DIR.parent.name != "custom_nodes":
        return None
    return PACK_DIR.parent.parent / "models" / "EasyAnimate"


def input_folder() -> Path | None:
    """ComfyUI/input when the pack sits in ComfyUI/custom_nodes/."""
    return None if PACK_DIR.parent.name != "custom_nodes" else PACK_DIR.parent.parent / "input"


def main() -> int:
    sys.path.insert(0, str(PACK_DIR))
    missing = missing_packages()
    if missing:
        print(f"EasyAnimate: missing packages; install them with: {sys.executable} -m pip install "
              + " ".join(missing))
    folder = models_folder()
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        from easyanimate_core.loading import OFFICIAL_MODELS

        print(f"EasyAnimate: model folders go in {folder}; the Model Loader downloads an official model on "
              "first use, or download one by hand:")
        for name in OFFICIAL_MODELS:
            print(f"  hf download alibaba-pai/{name} --local-dir {folder / name}")
    inputs = input_folder()
    if inputs is not None:
        from example_inputs import copy_missing

        copied = copy_missing(inputs)
        print(f"EasyAnimate: example inputs for the workflows in {inputs}: "
              + (", ".join(copied) + " copied" if copied else "already there"))
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
