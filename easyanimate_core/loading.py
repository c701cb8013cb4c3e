"""Model folder validation, model-kind detection and low-memory weight loading.

A model folder is the published diffusers layout (see EXPECTED_TREE). Everything is checked before
any weight is read, so a half-downloaded folder fails at once with the missing path named.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import CheckpointError, ModelFolderError
from .file_checks import check_file
from .safetensors_io import iter_tensors, read_index

# (name, tensor as read) -> the (name, tensor) pairs to load; see load_weights_into.
TensorTransform = Callable[[str, torch.Tensor], Iterable[tuple[str, torch.Tensor]]]

EXPECTED_TREE = """\
<model folder>/                      e.g. EasyAnimateV5-12b-zh-InP
  transformer/config.json
  transformer/diffusion_pytorch_model.safetensors   (or sharded, with diffusion_pytorch_model.safetensors.index.json)
  vae/config.json
  vae/diffusion_pytorch_model.safetensors
  text_encoder/config.json + model.safetensors         (BERT)
  tokenizer/vocab.txt + tokenizer_config.json
  text_encoder_2/config.json + model.safetensors       (mT5 encoder; or sharded, with model.safetensors.index.json)
  tokenizer_2/spiece.model + tokenizer_config.json
  scheduler/scheduler_config.json"""

OFFICIAL_MODELS = (
    "EasyAnimateV5-12b-zh-InP", "EasyAnimateV5-12b-zh-Control", "EasyAnimateV5-12b-zh",
    "EasyAnimateV5-7b-zh-InP", "EasyAnimateV5-7b-zh",
)


def official_model_for(name: str) -> str | None:
    """The official model a folder or repo name refers to (case-insensitive; the longest one it contains)."""
    wanted = name.rsplit("/", 1)[-1].lower()
    matches = [model for model in OFFICIAL_MODELS if model.lower() in wanted]
    exact = [model for model in matches if model.lower() == wanted]
    return (exact or sorted(matches, key=len, reverse=True) or [None])[0]


def download_hint(root: Path) -> str:
    """The command that fetches the model `root` names into `root`, or the choice of official models."""
    name = official_model_for(root.name)
    if name is not None:
        return (f"Download the whole folder: `hf download alibaba-pai/{name} --local-dir {root}` "
                f"(it resumes an interrupted download).")
    return (f"Download an official model folder: `hf download alibaba-pai/<model> --local-dir "
            f"{root.parent}/<model>` with <model> one of {', '.join(OFFICIAL_MODELS)}.")


SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".gguf")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def single_file_error(path: Path) -> ModelFolderError:
    """A single checkpoint file where a model folder is expected."""
    return ModelFolderError(
        f"{path} is a single file: single-file checkpoints are not supported. EasyAnimate V5 is loaded from the "
        f"folder Hugging Face publishes (each component in its own sub-folder), placed like this:\n"
        f"{EXPECTED_TREE}\n{download_hint(path.with_suffix(''))}")


def pickle_only_error(root: Path, folder: Path, pickles: list[Path]) -> CheckpointError:
    """A component folder with only pickle weights (.bin/.pt), which are never loaded."""
    names = ", ".join(p.name for p in pickles[:3])
    return CheckpointError(
        f"{folder} holds only pickle weights ({names}) and no .safetensors file. Pickle files are never loaded, "
        f"for safety (opening one can run code hidden in it). The official repositories publish safetensors "
        f"versions of every file. {download_hint(root)}")


KIND_BY_IN_CHANNELS = {16: "t2v", 33: "inpaint", 32: "control"}

_WEIGHT_CANDIDATES = {
    "transformer": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json"),
    "vae": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json"),
    "text_encoder": ("model.safetensors", "model.safetensors.index.json"),
    "text_encoder_2": ("model.safetensors", "model.safetensors.index.json"),
}
_REQUIRED_FILES = {
    "transformer": ("config.json",),
    "vae": ("config.json",),
    "text_encoder": ("config.json",),
    "text_encoder_2": ("config.json",),
    "tokenizer": ("vocab.txt",),
    "tokenizer_2": ("spiece.model",),
    "scheduler": ("scheduler_config.json",),
}


@dataclass(frozen=True)
class ModelFiles:
    """Validated paths of one model folder."""

    root: Path
    transformer_config: dict
    vae_config: dict
    scheduler_config: dict
    transformer_weights: tuple[Path, ...]
    vae_weights: tuple[Path, ...]
    text_encoder_weights: tuple[Path, ...]
    text_encoder_2_weights: tuple[Path, ...]

    @property
    def kind(self) -> str:
        return kind_from_config(self.transformer_config, self.root / "transformer" / "config.json")


def _missing(root: Path, what: Path, detail: str = "") -> ModelFolderError:
    extra = f" ({detail})" if detail else ""
    return ModelFolderError(
        f"EasyAnimate model folder {root} is incomplete: missing {what}{extra}.\n"
        f"Expected layout:\n{EXPECTED_TREE}\n{download_hint(root)}")


def _read_json(path: Path) -> dict:
    check_file(path)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc}); download it again.") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} should hold a JSON object.")
    return data


def _weight_files(root: Path, sub: str) -> tuple[Path, ...]:
    single, index_name = _WEIGHT_CANDIDATES[sub]
    folder = root / sub
    if (folder / single).is_file():
        return (folder / single,)
    index_path = folder / index_name
    if index_path.is_file():
        weight_map = _read_json(index_path).get("weight_map", {})
        shards = tuple(folder / name for name in sorted(set(weight_map.values())))
        if not shards:
            raise CheckpointError(f"{index_path} lists no weight files; download it again.")
        for shard in shards:
            if not shard.is_file():
                raise _missing(root, shard, f"listed in {index_path.name}")
        return shards
    pickles = sorted(p for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES) if folder.is_dir() else []
    if pickles:
        raise pickle_only_error(root, folder, pickles)
    raise _missing(root, folder / single)


# Files the tokenizers read when present (transformers looks for each by name).
_TOKENIZER_FILES = ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "tokenizer.json")


def _check_read_files(root: Path) -> None:
    """Every config and tokenizer file the loader reads: not empty, not a git-lfs pointer, not an HTML page."""
    for sub, names in _REQUIRED_FILES.items():
        for name in names:
            check_file(root / sub / name)
    for sub in ("tokenizer", "tokenizer_2"):
        for name in _TOKENIZER_FILES:
            if (root / sub / name).is_file():
                check_file(root / sub / name)


def kind_from_config(config: dict, where: Path | str = "transformer/config.json") -> str:
    """Model kind from the transformer's `in_channels`: 16 t2v, 33 inpaint, 32 control."""
    in_channels = config.get("in_channels")
    if in_channels not in KIND_BY_IN_CHANNELS:
        raise CheckpointError(
            f"{where}: in_channels {in_channels!r} is not an EasyAnimate V5 model "
            f"(16 = text-to-video, 33 = InP, 32 = Control). V5.1 models are not supported by this loader.")
    return KIND_BY_IN_CHANNELS[in_channels]


def validate_model_dir(model_dir: str | Path) -> ModelFiles:
    """Check every file of the layout exists and every safetensors header is intact; no weights are read."""
    root = Path(model_dir).expanduser()
    if root.is_file() and root.suffix.lower() in SINGLE_FILE_SUFFIXES:
        raise single_file_error(root)
    if not root.is_dir():
        raise ModelFolderError(
            f"EasyAnimate model folder {root} does not exist.\nExpected layout:\n{EXPECTED_TREE}\n{download_hint(root)}")
    for sub, names in _REQUIRED_FILES.items():
        if not (root / sub).is_dir():
            raise _missing(root, root / sub, "folder")
        for name in names:
            if not (root / sub / name).is_file():
                raise _missing(root, root / sub / name)
    _check_read_files(root)
    weights = {sub: _weight_files(root, sub) for sub in _WEIGHT_CANDIDATES}
    for paths in weights.values():
        for path in paths:
            read_index(path)  # raises CheckpointError naming a truncated or corrupt file
    transformer_config = _read_json(root / "transformer" / "config.json")
    files = ModelFiles(
        root=root,
        transformer_config=transformer_config,
        vae_config=_read_json(root / "vae" / "config.json"),
        scheduler_config=_read_json(root / "scheduler" / "scheduler_config.json"),
        transformer_weights=weights["transformer"],
        vae_weights=weights["vae"],
        text_encoder_weights=weights["text_encoder"],
        text_encoder_2_weights=weights["text_encoder_2"],
    )
    files.kind  # validate in_channels early
    return files


def load_weights_into(module: nn.Module, paths: tuple[Path, ...], *, dtype: torch.dtype,
                      device: torch.device | str = "cpu", transform: TensorTransform | None = None) -> nn.Module:
    """Fill a module built on the meta device with the weights in `paths`, one tensor at a time.

    Keys must match exactly; a missing or unexpected key raises CheckpointError naming the file.
    `transform(name, tensor)`, if given, sees each tensor as read (the file's dtype, on `device`)
    and yields the (name, tensor) pairs to load instead, already in their final dtype: fp8.py uses
    it to quantise weights as they arrive and to add their scales.
    """
    expected = dict(module.state_dict(keep_vars=True))
    state: dict[str, torch.Tensor] = {}
    for path in paths:
        index = read_index(path)
        unexpected = sorted(set(index.entries) - set(expected))
        if unexpected:
            raise CheckpointError(
                f"{path} does not fit this model: {len(unexpected)} unexpected tensors, e.g. {unexpected[:5]}. "
                "Is this an EasyAnimate V5 checkpoint of the right kind (not V5.1, not a LoRA)?")
        for name, entry in index.entries.items():
            if tuple(expected[name].shape) != entry.shape:
                raise CheckpointError(f"{path}: tensor {name!r} has shape {list(entry.shape)}, the model expects "
                                      f"{list(expected[name].shape)} (config.json and weights disagree).")
        if transform is None:
            state.update(iter_tensors(index, dtype=dtype, device=device))
        else:
            for name, tensor in iter_tensors(index, device=device):
                state.update(transform(name, tensor))
                del tensor
    missing = sorted(set(expected) - set(state))
    if missing:
        raise CheckpointError(f"{paths[0].parent} is missing {len(missing)} tensors, e.g. {missing[:5]}; "
                              "the weights file is incomplete or from another model.")
    module.load_state_dict(state, strict=True, assign=True)
    for parameter in module.parameters():
        parameter.requires_grad_(False)
    return module.eval()
