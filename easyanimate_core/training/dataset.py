"""Training samples: a folder of images/videos with same-name .txt captions, or the original's JSON list.

    items = scan_folder("data/style")                # image.png + image.txt, clip.mp4 + clip.txt, ...
    items = read_json_list("data/meta.json")         # [{"file_path", "text", "type"}, ...] as the original
    sample = load_sample(items[0], DatasetSettings(resolution=512, max_frames=49))

Images train as 1-frame videos, videos as 4k+1 frames (at most `max_frames`). Sizes follow the
original's aspect-ratio buckets, scaled so every sample has about the same token budget
(resolution² × max_frames pixels): a 49-frame video at 512 buckets, a 1-frame image at
`image_resolution` (default 1024). Missing captions are refused by default (the files are listed);
`missing_captions="filename"` uses the file name instead.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..buckets import bucket_size, floor_to_multiple, round_frames
from ..errors import UnsupportedRequestError
from ..media import VIDEO_SUFFIXES

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
CAPTION_POLICIES = ("refuse", "filename")


class DatasetError(UnsupportedRequestError):
    """The dataset folder or list cannot be used as given (the message says how to fix it)."""


@dataclass(frozen=True)
class TrainItem:
    """One file of the dataset and its caption."""

    path: Path
    caption: str
    kind: str          # "image" or "video"
    repeat: int = 1


@dataclass(frozen=True)
class DatasetSettings:
    """How files become training tensors; part of the cache key."""

    resolution: int = 512          # bucket base side for a max_frames video
    max_frames: int = 49           # 4k+1
    image_resolution: int = 1024   # bucket base side cap (images reach it)

    def __post_init__(self):
        if self.resolution < 16 or self.image_resolution < 16:
            raise DatasetError(f"resolution must be at least 16, got {self.resolution}/{self.image_resolution}")
        if self.max_frames < 1:
            raise DatasetError(f"max_frames must be at least 1, got {self.max_frames}")

    def bucket(self, height: int, width: int, frames: int) -> tuple[int, int]:
        """(height, width) for a sample: the aspect bucket at the side its token budget allows."""
        budget = self.resolution ** 2 * round_frames(self.max_frames)
        base = min(self.image_resolution, math.sqrt(budget / frames))
        return bucket_size(height, width, base_resolution=max(16, floor_to_multiple(base)))


@dataclass
class Sample:
    """Pixels of one item, ready for the VAE: [1,3,F,H,W] in [-1, 1]."""

    item: TrainItem
    pixels: torch.Tensor
    notes: list[str] = field(default_factory=list)


def _kind(path: Path) -> str | None:
    suffix = path.suffix.lower()
    return "image" if suffix in IMAGE_SUFFIXES else "video" if suffix in VIDEO_SUFFIXES else None


def _caption_from_name(path: Path) -> str:
    return path.stem.replace("_", " ").replace("-", " ").strip()


def scan_folder(folder, missing_captions: str = "refuse", repeat: int = 1) -> list[TrainItem]:
    """Images and videos in `folder` (not recursive) with their same-name .txt captions, sorted by name.

    A folder holding exactly one .json file and no media is read as the original's JSON list.
    """
    folder = Path(folder).expanduser()
    if missing_captions not in CAPTION_POLICIES:
        raise DatasetError(f"missing_captions must be one of {CAPTION_POLICIES}, got {missing_captions!r}")
    if folder.is_file() and folder.suffix.lower() == ".json":
        return read_json_list(folder, repeat=repeat)
    if not folder.is_dir():
        raise DatasetError(f"dataset folder {folder} does not exist")
    media = sorted(p for p in folder.iterdir() if p.is_file() and _kind(p))
    if not media:
        lists = sorted(folder.glob("*.json"))
        if len(lists) == 1:
            return read_json_list(lists[0], repeat=repeat)
        raise DatasetError(
            f"dataset folder {folder} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}) or videos "
            f"({', '.join(sorted(VIDEO_SUFFIXES))}). Put the training files there, each with a same-name .txt "
            "caption (cat.png + cat.txt), or give the original's JSON list.")
    items, missing = [], []
    for path in media:
        caption_file = path.with_suffix(".txt")
        if caption_file.is_file():
            caption = caption_file.read_text(encoding="utf-8").strip()
        elif missing_captions == "filename":
            caption = _caption_from_name(path)
        else:
            missing.append(path.name)
            continue
        items.append(TrainItem(path, caption, _kind(path), repeat))
    if missing:
        raise DatasetError(
            f"{len(missing)} of {len(media)} files in {folder} have no caption file: {', '.join(missing[:5])}"
            f"{' …' if len(missing) > 5 else ''}. Add a same-name .txt next to each (e.g. "
            f"{Path(missing[0]).stem}.txt), or use the file names as captions (missing_captions='filename', "
            "CLI --captions-from-filenames).")
    return items


def read_json_list(path, repeat: int = 1) -> list[TrainItem]:
    """The original's metadata list: [{"file_path": ..., "text": ..., "type": "image"|"video"}, ...];
    relative paths are relative to the JSON file's folder."""
    path = Path(path)
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DatasetError(f"cannot read the dataset list {path}: {exc}") from exc
    if not isinstance(entries, list) or not entries:
        raise DatasetError(f"{path} should be a non-empty JSON list of {{\"file_path\", \"text\", \"type\"}} objects")
    items = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or "file_path" not in entry or "text" not in entry:
            raise DatasetError(f"{path}: entry {i} needs \"file_path\" and \"text\", got {entry!r}")
        file = Path(entry["file_path"])
        file = file if file.is_absolute() else path.parent / file
        kind = entry.get("type") or _kind(file)
        if kind not in ("image", "video"):
            raise DatasetError(f"{path}: entry {i} ({file.name}) has type {kind!r}; use \"image\" or \"video\"")
        items.append(TrainItem(file, str(entry["text"]), kind, repeat))
    return items


def read_media(item: TrainItem, max_frames: int) -> torch.Tensor:
    """[F,H,W,3] float32 0..1 (images: F = 1; videos: the first 4k+1 frames up to max_frames)."""
    from ..media import read_frames, read_image

    if not item.path.is_file():
        raise DatasetError(f"training file {item.path} does not exist")
    try:
        if item.kind == "image":
            frames = read_image(item.path).unsqueeze(0)
        else:
            frames = read_frames(item.path, max_frames=round_frames(max_frames))
    except Exception as exc:  # PIL / imageio raise many types for a broken file
        raise DatasetError(f"cannot read training file {item.path}: {exc}. Remove it from the dataset or "
                           "re-export it (PNG/JPEG images, MP4/WebM videos).") from exc
    return frames[:round_frames(frames.shape[0])]


def to_pixels(frames: torch.Tensor, settings: DatasetSettings) -> torch.Tensor:
    """[F,H,W,3] 0..1 → [1,3,F,h,w] in [-1,1] at the sample's bucket: resize to cover, centre crop."""
    f, h, w, _ = frames.shape
    th, tw = settings.bucket(h, w, f)
    scale = max(th / h, tw / w)
    rh, rw = max(th, round(h * scale)), max(tw, round(w * scale))
    video = frames.permute(0, 3, 1, 2).float()
    if (rh, rw) != (h, w):
        video = F.interpolate(video, size=(rh, rw), mode="bilinear", align_corners=False, antialias=True)
    top, left = (rh - th) // 2, (rw - tw) // 2
    video = video[:, :, top:top + th, left:left + tw].clamp(0, 1)
    return ((video - 0.5) / 0.5).permute(1, 0, 2, 3).unsqueeze(0).contiguous()


def items_from_images(images: torch.Tensor, captions: list[str]) -> list[tuple[TrainItem, torch.Tensor]]:
    """In-memory images [N,H,W,3] 0..1 (a ComfyUI IMAGE batch) with one caption each (or one for all)."""
    if images.dim() != 4 or images.shape[-1] != 3:
        raise DatasetError(f"images must be [N, H, W, 3], got {list(images.shape)}")
    if len(captions) == 1:
        captions = captions * images.shape[0]
    if len(captions) != images.shape[0]:
        raise DatasetError(f"{images.shape[0]} images but {len(captions)} captions: give one caption per line, "
                           "one per image (or a single caption for all)")
    return [(TrainItem(Path(f"image_{i:04d}.png"), c.strip(), "image"), images[i:i + 1].float())
            for i, c in enumerate(captions)]
