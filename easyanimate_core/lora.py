"""LoRA for the V5 transformer: kohya and diffusers/peft safetensors, stacked, applied at run time.

    report = set_loras(transformer, [("style.safetensors", 0.7), ("motion.safetensors", -0.3)])
    set_loras(transformer, [])  # back to the base model

Every targeted Linear gets a forward hook adding `x @ down.T @ (scale * up).T` to its output, with
scale = strength * alpha / rank; stacked LoRAs are concatenated along the rank, so each layer does
one extra pair of thin matmuls whatever their number. The base weights are never written.

Why at run time rather than merging into the weights (benchmarks/lora_cost.py measures both):
- Correctness: nothing to restore, so base weights are bit-identical after a change, a removal, an
  interrupt or an exception, in any dtype. Merging into bf16/fp8 weights cannot be undone exactly
  (the original pack's drift) and adding a delta to float8 weights would quantise it away; the
  run-time update is computed in the activation dtype (bf16 for float8 storage), so it composes
  with layers that upcast their weights per call.
- Memory: rank r adds r * (in + out) values per Linear: 3.9 % (r = 64) or 7.8 % (r = 128) of the 12B
  weights in bf16, whereas restoring exactly after a merge needs a pristine copy of every targeted
  weight (about 100 %).
- Time: the extra thin matmuls are r * (in + out) / (in * out) of the Linear FLOPs, 1.8 % (r = 64) or
  3.6 % (r = 128) of a guided 12B step at 384x672x49; thin matmuls run below peak, so expect somewhat
  more. Setting a LoRA costs a few hundredths of a step. A merge costs nothing per step but a pass
  over all weights per change.

The factors are non-persistent buffers (absent from state_dict), so `.to(device)` and offloading
move them with their layer. They are stored as raw bits in an integer dtype, so that a later
`module.to(dtype)` (a cast to float8 storage, say) leaves them exact; the hook views them back.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .block_swap import suspended
from .errors import CheckpointError, ModelFolderError
from .loading import PICKLE_SUFFIXES
from .safetensors_io import iter_tensors, read_index

_KOHYA_PREFIX = "lora_unet_"
_PEFT_PREFIX = "transformer."
_SUFFIXES = {".lora_down.weight": "down", ".lora_up.weight": "up", ".lora_A.weight": "down",
             ".lora_B.weight": "up", ".alpha": "alpha"}
_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_CACHE_MAX_BYTES = 2 << 30  # files of the current call are kept whatever their size
_cache: OrderedDict[tuple, dict[str, Tensor]] = OrderedDict()


@dataclass
class LoraFileReport:
    """What one file of the stack did."""

    path: Path
    strength: float
    matched: int                       # Linear layers this file updates
    unmatched_keys: list[str] = field(default_factory=list)


@dataclass
class LoraReport:
    """What `set_loras` applied: one entry per file, in order."""

    files: list[LoraFileReport] = field(default_factory=list)
    targets: int = 0                   # distinct Linear layers updated by the whole stack

    def summary(self, max_keys: int = 5) -> str:
        """One line per file: strength, layers matched, the first unmatched keys."""
        lines = []
        for f in self.files:
            line = f"{f.path.name} @ {f.strength:g}: {f.matched} layers"
            if f.unmatched_keys:
                more = len(f.unmatched_keys) - max_keys
                line += f", {len(f.unmatched_keys)} unmatched keys: {', '.join(f.unmatched_keys[:max_keys])}"
                line += f" (+{more} more)" if more > 0 else ""
            lines.append(line)
        return "\n".join(lines) or "no LoRA"


def set_loras(transformer: nn.Module, loras: list[tuple[str | os.PathLike, float]]) -> LoraReport:
    """Make `transformer` compute with exactly these (path, strength) LoRAs, replacing earlier ones.

    Files are read and checked before the model is touched, so a bad file leaves the previous set active.
    Raises CheckpointError for a file that is unreadable, matches no layer, or has wrong shapes, and
    ModelFolderError (a FileNotFoundError) for a missing file. With block swap on, the swapped blocks
    hold their real tensors meanwhile, and their new factors are swapped out with them afterwards.
    A transformer run by worker processes (parallel/workers.py) has them set there, through its
    `set_loras_remote`.
    """
    remote = getattr(transformer, "set_loras_remote", None)
    if remote is not None:
        return remote(list(loras))
    with suspended(transformer):
        return _set_loras(transformer, loras)


def _set_loras(transformer: nn.Module, loras: list[tuple[str | os.PathLike, float]]) -> LoraReport:
    linears = {name: m for name, m in transformer.named_modules() if isinstance(m, nn.Linear)}
    report = LoraReport()
    per_layer: dict[str, list[tuple[Tensor, Tensor, float]]] = {}
    for path, strength in loras:
        path = Path(path)
        pairs, unmatched = _match(_read(path), linears, path)
        report.files.append(LoraFileReport(path, float(strength), len(pairs), unmatched))
        for name, (down, up, alpha) in pairs.items():
            scale = float(strength) * (alpha / down.shape[0] if alpha is not None else 1.0)
            if scale != 0.0:
                per_layer.setdefault(name, []).append((down, up, scale))
    _trim_cache(keep={_cache_key(Path(p)) for p, _ in loras})

    dtype = getattr(transformer, "compute_dtype", None) or torch.float32
    remove_loras(transformer)
    try:
        with torch.inference_mode(False), torch.no_grad():  # plain tensors even if called under inference_mode
            for name, factors in per_layer.items():
                _attach(linears[name], factors, dtype)
    except BaseException:
        remove_loras(transformer)
        raise
    report.targets = len(per_layer)
    return report


def remove_loras(transformer: nn.Module) -> None:
    """Drop every LoRA set by `set_loras` (the base weights were never changed)."""
    for module in transformer.modules():
        handle = module.__dict__.pop("_lora_handle", None)
        if handle is not None:
            handle.remove()
            del module.lora_down, module.lora_up, module._lora_dtype


def move_lora(old: nn.Linear, new: nn.Linear) -> None:
    """Carry the LoRA `set_loras` attached to `old` (factors + hook) over to a layer replacing it."""
    handle = old.__dict__.pop("_lora_handle", None)
    if handle is None:
        return
    handle.remove()
    new.register_buffer("lora_down", old.lora_down, persistent=False)
    new.register_buffer("lora_up", old.lora_up, persistent=False)
    new._lora_dtype = old._lora_dtype
    new._lora_handle = new.register_forward_hook(_lora_hook)


def clear_cache() -> None:
    """Forget the parsed LoRA files kept for quick re-setting."""
    _cache.clear()


def _lora_hook(module: nn.Linear, args: tuple, output: Tensor) -> Tensor:
    dtype, device = output.dtype, output.device
    down = module.lora_down.view(module._lora_dtype).to(device, dtype)
    up = module.lora_up.view(module._lora_dtype).to(device, dtype)
    low = F.linear(args[0].to(dtype), down)
    # Accumulating into the fresh output inside the GEMM saves a [tokens, out] temporary and a pass over it.
    flat = output.reshape(-1, output.shape[-1])
    return flat.addmm_(low.reshape(-1, low.shape[-1]), up.t()).view(output.shape)


_lora_hook.inplace_safe = True  # updates the output in place and keeps no reference: later in-place ops are safe


def _attach(linear: nn.Linear, factors: list[tuple[Tensor, Tensor, float]], dtype: torch.dtype) -> None:
    device = linear.weight.device if linear.weight.device.type != "meta" else torch.device("cpu")
    down = torch.cat([d.float() for d, _, _ in factors])
    up = torch.cat([u.float() * s for _, u, s in factors], dim=1)
    for name, t in (("lora_down", down), ("lora_up", up)):
        linear.register_buffer(name, t.to(device, dtype).view(_BITS[dtype.itemsize]), persistent=False)
    linear._lora_dtype = dtype
    linear._lora_handle = linear.register_forward_hook(_lora_hook)


def _cache_key(path: Path) -> tuple:
    try:
        st = path.stat()
    except OSError:
        return (str(path),)
    return (str(path.resolve()), st.st_mtime_ns, st.st_size)


def _read(path: Path) -> dict[str, Tensor]:
    """All tensors of a LoRA file (cached by path, mtime and size)."""
    key = _cache_key(path)
    if key in _cache:
        _cache.move_to_end(key)
        return _cache[key]
    if not path.is_file():
        raise ModelFolderError(f"LoRA file not found: {path}")
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise CheckpointError(pickle_lora_message(path))
    try:
        tensors = dict(iter_tensors(read_index(path)))
    except CheckpointError as exc:
        hint = "" if path.suffix == ".safetensors" else " Only .safetensors LoRA files are supported."
        raise CheckpointError(f"cannot read LoRA {path}: {exc}{hint}") from exc
    _cache[key] = tensors
    return tensors


def pickle_lora_message(path: Path) -> str:
    """Why a .pt/.bin/.ckpt LoRA is refused (said before anything is read from it)."""
    return (f"LoRA {path} is a pickle file ({path.suffix}): pickle files are never loaded, for safety (opening one "
            "can run code hidden in it). Only .safetensors LoRA files are supported: use the .safetensors version "
            "of this LoRA.")


def _trim_cache(keep: set) -> None:
    total = sum(t.nbytes for ts in _cache.values() for t in ts.values())
    for key in list(_cache):
        if total <= _CACHE_MAX_BYTES:
            break
        if key not in keep:
            total -= sum(t.nbytes for t in _cache.pop(key).values())


def _match(tensors: dict[str, Tensor], linears: dict[str, nn.Linear], path: Path):
    """{layer name: (down, up, alpha or None)} and the sorted keys that name no Linear of the model."""
    # Module names contain underscores themselves, so kohya names are looked up, never split.
    kohya_names = {name.replace(".", "_"): name for name in linears}
    groups: dict[str, dict[str, tuple[str, Tensor]]] = {}
    unmatched = []
    for key, tensor in tensors.items():
        suffix = next((s for s in _SUFFIXES if key.endswith(s)), None)
        stem = key[: -len(suffix)] if suffix else key
        if stem.startswith(_KOHYA_PREFIX):
            name = kohya_names.get(stem[len(_KOHYA_PREFIX):].lstrip("_"))
        else:
            name = stem if stem in linears else stem.removeprefix(_PEFT_PREFIX)
        if suffix is None or name not in linears:
            unmatched.append(key)
        else:
            groups.setdefault(name, {})[_SUFFIXES[suffix]] = (key, tensor)

    pairs = {}
    for name, parts in groups.items():
        if "down" not in parts or "up" not in parts:
            unmatched.extend(key for key, _ in parts.values())
            continue
        down, up = parts["down"][1], parts["up"][1]
        weight = linears[name].weight
        if down.ndim != 2 or up.ndim != 2 or up.shape[1] != down.shape[0] or \
                (up.shape[0], down.shape[1]) != tuple(weight.shape):
            raise CheckpointError(
                f"LoRA {path}: layer {name} has factors {list(up.shape)} @ {list(down.shape)} but the model's weight "
                f"is {list(weight.shape)}. The LoRA was trained for a different model (size).")
        alpha = float(parts["alpha"][1]) if "alpha" in parts else None
        pairs[name] = (down, up, alpha)

    if not pairs:
        lora_like = any(k.endswith(s) for k in tensors for s in _SUFFIXES)
        cause = ("its layer names fit no layer of this EasyAnimate V5 transformer: it was probably trained for "
                 "V5.1 (whose text layers are named attn1.add_q_proj ...) or for another model"
                 if lora_like else "it holds no LoRA factors (lora_down/lora_up or lora_A/lora_B): it looks like "
                 "a full checkpoint or another kind of file, not a LoRA")
        raise CheckpointError(f"LoRA {path} matches no layer of the model: {cause}. "
                              f"First keys: {sorted(tensors)[:5]}")
    return pairs, sorted(unmatched)
