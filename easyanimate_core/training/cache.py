"""VAE latents and text embeddings, computed once per file and stored next to the dataset.

    encoders = PipelineEncoders(pipe)
    samples = build_cache(encoders, items, DatasetSettings(), cache_dir=data / ".easyanimate_cache")

The cache folder holds `manifest.json` (which VAE, text encoders, model kind and settings made it) and
one safetensors file per item: the VAE posterior (mean, std; training draws a fresh sample each step, as
the original) and the caption's BERT/mT5 states, tokenised as the original trainer does (no special
tokens). An entry is re-used while its file's size, mtime and caption are unchanged. A cache made by
another VAE/text encoder, model kind or settings is refused with what differs (rebuild=True replaces it).
During training only the transformer is needed: the VAE and text encoders can leave memory.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..errors import EasyAnimateError
from ..text import MAX_TEXT_TOKENS
from .dataset import DatasetSettings, TrainItem, read_media, to_pixels
from .files import save_safetensors_atomic

CACHE_FORMAT = 1
DEFAULT_CACHE_DIR = ".easyanimate_cache"


class CacheMismatchError(EasyAnimateError, ValueError):
    """The cache folder was made for another model or other settings."""


@dataclass
class CachedSample:
    """One training sample as the trainer needs it (CPU float32)."""

    caption: str
    mean: Tensor                      # VAE posterior [1,16,T,h,w], unscaled
    std: Tensor
    bert: Tensor                      # [1,77,D]
    t5: Tensor                        # [1,256,D2]
    repeat: int = 1
    blank_mean: Tensor | None = None  # InP: posterior of the all -1 video (the original's full-mask branch)
    blank_std: Tensor | None = None
    source: str = ""

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return tuple(self.mean.shape)


def module_fingerprint(module) -> str:
    """A content hash of a module's weights (names, shapes, dtypes and the first values of each tensor)."""
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        if t.numel():
            h.update(t.detach().reshape(-1)[:256].to("cpu", torch.float32).numpy().tobytes())
    return h.hexdigest()[:16]


def training_text_embeds(text_encoders, caption: str) -> tuple[Tensor, Tensor]:
    """BERT and mT5 states of one caption as the original trainer makes them: padded to max length,
    **without special tokens** (no [CLS]/[SEP], no </s>; inference adds them), no attention mask."""
    states = []
    for tokenizer, model in ((text_encoders.bert_tokenizer, text_encoders.bert),
                             (text_encoders.t5_tokenizer, text_encoders.t5)):
        max_length = min(tokenizer.model_max_length, MAX_TEXT_TOKENS)
        ids = tokenizer([caption], padding="max_length", max_length=max_length, truncation=True,
                        add_special_tokens=False, return_tensors="pt").input_ids
        device = next(model.parameters()).device
        with torch.inference_mode():
            state = model(input_ids=ids.to(device)).last_hidden_state.to("cpu", torch.float32)
        states.append(state.clone())  # an ordinary tensor (usable with autograd), not an inference tensor
    return states[0], states[1]


class PipelineEncoders:
    """The VAE and text encoders of a core Pipeline, each on the device only while used (its placement)."""

    def __init__(self, pipe):
        self.pipe = pipe
        self.kind = pipe.kind
        self.vae_fingerprint = module_fingerprint(pipe.vae)
        self.text_fingerprint = module_fingerprint(pipe.text_encoders.bert) + module_fingerprint(pipe.text_encoders.t5)

    def encode_video(self, pixels: Tensor):
        with torch.inference_mode(), self.pipe._use("vae"):
            posterior = self.pipe.vae.encode(pixels.to(self.pipe.device, self.pipe.vae.dtype))
            mean, std = posterior.mean.to("cpu", torch.float32), posterior.std.to("cpu", torch.float32)
        return mean.clone(), std.clone()  # ordinary tensors, not inference tensors

    def encode_text(self, caption: str) -> tuple[Tensor, Tensor]:
        with self.pipe._use("text"):
            return training_text_embeds(self.pipe.text_encoders, caption)


def _manifest(encoders, settings: DatasetSettings) -> dict:
    return {"format": CACHE_FORMAT, "vae": encoders.vae_fingerprint, "text_encoders": encoders.text_fingerprint,
            "kind": encoders.kind, "settings": asdict(settings)}


def _check_manifest(cache_dir: Path, wanted: dict, rebuild: bool) -> None:
    path = cache_dir / "manifest.json"
    if path.is_file() and not rebuild:
        try:
            found = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            found = {}
        differ = [k for k in wanted if found.get(k) != wanted[k]]
        if differ:
            what = {"vae": "another VAE", "text_encoders": "other text encoders", "kind": f"a {found.get('kind')} "
                    f"model (this one is {wanted['kind']})", "settings": f"other settings {found.get('settings')}",
                    "format": "an older version"}
            raise CacheMismatchError(
                f"the training cache {cache_dir} was made with {', '.join(what[k] for k in differ)}: its latents "
                "do not fit this model. Rebuild it (rebuild_cache=True, CLI --rebuild-cache, node input "
                "rebuild_cache) or delete the folder.")
    if rebuild and cache_dir.is_dir():
        for old in cache_dir.glob("*.safetensors"):
            old.unlink()
    cache_dir.mkdir(parents=True, exist_ok=True)
    (cache_dir / "manifest.json").write_text(json.dumps(wanted, indent=1), encoding="utf-8")


def _entry_name(index: int, item: TrainItem) -> str:
    return f"{index:05d}_{item.path.stem[:60]}.safetensors"


def _source_meta(item: TrainItem) -> dict[str, str]:
    st = item.path.stat()
    return {"source": item.path.name, "size": str(st.st_size), "mtime_ns": str(st.st_mtime_ns),
            "caption_sha": hashlib.sha256(item.caption.encode()).hexdigest()}


def _load_entry(path: Path, meta: dict[str, str]) -> dict[str, Tensor] | None:
    from safetensors import safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), "pt") as f:
            if {k: f.metadata().get(k) for k in meta} != meta:
                return None
            return {k: f.get_tensor(k) for k in f.keys()}
    except Exception:  # a damaged entry is simply recomputed
        return None


def encode_sample(encoders, pixels: Tensor, caption: str) -> dict[str, Tensor]:
    """Posterior (+ the blank video's for InP) and text states of one sample, as cache tensors."""
    mean, std = encoders.encode_video(pixels)
    bert, t5 = encoders.encode_text(caption)
    tensors = {"mean": mean, "std": std, "bert": bert, "t5": t5}
    if encoders.kind == "inpaint":
        tensors["blank_mean"], tensors["blank_std"] = encoders.encode_video(torch.full_like(pixels, -1.0))
    return tensors


def _sample(tensors: dict[str, Tensor], item: TrainItem) -> CachedSample:
    return CachedSample(item.caption, tensors["mean"], tensors["std"], tensors["bert"], tensors["t5"], item.repeat,
                        tensors.get("blank_mean"), tensors.get("blank_std"), str(item.path))


def build_cache(encoders, items: list[TrainItem], settings: DatasetSettings, cache_dir=None, *,
                rebuild: bool = False, progress: Callable[[int, int, str], None] | None = None) -> list[CachedSample]:
    """Encode every item (re-using valid cache entries when `cache_dir` is given) and return the samples."""
    if not items:
        from .dataset import DatasetError

        raise DatasetError("the dataset is empty: nothing to train on")
    cache_dir = Path(cache_dir) if cache_dir is not None else None
    if cache_dir is not None:
        _check_manifest(cache_dir, _manifest(encoders, settings), rebuild)
    samples = []
    for i, item in enumerate(items):
        if progress:
            progress(i, len(items), item.path.name)
        meta = _source_meta(item) if cache_dir is not None else {}
        tensors = _load_entry(cache_dir / _entry_name(i, item), meta) if cache_dir is not None else None
        if tensors is None:
            pixels = to_pixels(read_media(item, settings.max_frames), settings)
            tensors = encode_sample(encoders, pixels, item.caption)
            if cache_dir is not None:
                save_safetensors_atomic(cache_dir / _entry_name(i, item), tensors, meta)
        samples.append(_sample(tensors, item))
    if progress:
        progress(len(items), len(items), "")
    return samples


def samples_from_frames(encoders, pairs: list[tuple[TrainItem, Tensor]], settings: DatasetSettings) -> list[CachedSample]:
    """Encode in-memory frames ([F,H,W,3] 0..1 each, e.g. a ComfyUI IMAGE batch); nothing is written."""
    return [_sample(encode_sample(encoders, to_pixels(frames, settings), item.caption), item) for item, frames in pairs]
