"""float8 weight storage for the V5 transformer: about half the bytes of bf16, computed in bf16/fp16/fp32.

    model = load_transformer(files, dtype=torch.bfloat16, device="cuda", fp8=True)   # or
    quantize_to_fp8(model, torch.bfloat16)                                           # an already loaded model

Every nn.Linear inside `transformer_blocks` (attention q/k/v/out, the adaLN `norm1`/`norm2` linears,
`ff`/`txt_ff`), which hold over 99 % of the 12B weights, becomes an `Fp8Linear`: the weight is stored
as float8_e4m3fn with one float32 scale per output channel (row amax / 448, so no row clips and a
small row keeps its relative precision), the bias in the compute dtype. Each call upcasts the weight
to the input's dtype, rescales it and runs a plain F.linear, so activations never see float8.
Everything else (patch embedding `proj`, time embedding, text projections, norms, `norm_out`,
`proj_out`) stays in the compute dtype, which is also what the model's `compute_dtype` reports.

Unlike the original's "qfloat8" (a plain cast without scales, see docs §9), the per-channel scale
keeps a layer whose weights are all small or one row large from flushing to zero or saturating.

`Fp8Linear` subclasses nn.Linear and returns a fresh tensor, so LoRA forward hooks (lora.py) attach
to it and add in place as to any Linear. `weight` and `bias` keep their state-dict names;
`weight_scale` is an extra persistent buffer. `.to(device)` moves all three; a `.to(dtype)` on the
module would also upcast the float8 weight (still correct, but the memory saving is gone).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import UnsupportedRequestError
from .lora import move_lora

FP8_DTYPE = getattr(torch, "float8_e4m3fn", None)
FP8_MAX = 448.0  # largest finite float8_e4m3fn value
BLOCKS_PREFIX = "transformer_blocks."
_CHUNK_ELEMENTS = 1 << 22  # rows quantised at a time: 16 MB of float32 temporaries


def fp8_available() -> bool:
    """Whether this torch build has torch.float8_e4m3fn (PyTorch >= 2.1)."""
    return FP8_DTYPE is not None


def require_fp8() -> torch.dtype:
    """torch.float8_e4m3fn, or an UnsupportedRequestError saying which torch is needed."""
    if FP8_DTYPE is None:
        raise UnsupportedRequestError(
            f"fp8 weight storage needs torch.float8_e4m3fn, which this PyTorch build ({torch.__version__}) lacks. "
            "Upgrade to PyTorch 2.1 or later, or load the model without fp8 (bf16/fp16 weights).")
    return FP8_DTYPE


def quantize_weight(weight: Tensor) -> tuple[Tensor, Tensor]:
    """(float8_e4m3fn weight, float32 per-row scale) with weight ≈ q.float() * scale[:, None].

    scale = row amax / 448; an all-zero (or non-finite) row gets scale 1 and stays zero-coded.
    Rows are converted in chunks of about _CHUNK_ELEMENTS, so the float32 temporaries stay small
    whatever the layer's size. A meta weight gives meta results (shapes and dtypes only).
    """
    fp8 = require_fp8()
    out_features = weight.shape[0]
    q = torch.empty(weight.shape, dtype=fp8, device=weight.device)
    scale = torch.empty(out_features, dtype=torch.float32, device=weight.device)
    if weight.is_meta:
        return q, scale
    rows = max(1, _CHUNK_ELEMENTS // max(1, weight[0].numel()))
    with torch.no_grad():
        for start in range(0, out_features, rows):
            w = weight[start:start + rows].float()
            amax = w.abs().amax(dim=1)
            s = torch.where((amax > 0) & torch.isfinite(amax), amax / FP8_MAX, torch.ones_like(amax))
            q[start:start + rows] = (w / s[:, None]).clamp_(-FP8_MAX, FP8_MAX)
            scale[start:start + rows] = s
    return q, scale


class Fp8Linear(nn.Linear):
    """nn.Linear whose weight is float8_e4m3fn with a float32 per-output-channel scale.

    forward(x) = F.linear(x, weight.to(x.dtype) * scale[:, None], bias): a fresh tensor in x's dtype.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None,
                 compute_dtype: torch.dtype = torch.bfloat16):
        nn.Module.__init__(self)  # not nn.Linear.__init__: it would allocate and initialise a full-precision weight
        fp8 = require_fp8()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty((out_features, in_features), dtype=fp8, device=device),
                                   requires_grad=False)
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32, device=device))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, dtype=compute_dtype, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, compute_dtype: torch.dtype) -> "Fp8Linear":
        """Quantise a Linear's weight (any dtype and device, meta included); bias cast to compute_dtype."""
        weight = linear.weight
        new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta",
                  compute_dtype=compute_dtype)
        with torch.no_grad():
            q, scale = quantize_weight(weight)
            new.weight = nn.Parameter(q, requires_grad=False)
            new.weight_scale = scale
            if linear.bias is not None:
                new.bias = nn.Parameter(linear.bias.detach().to(compute_dtype), requires_grad=False)
        return new

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The weight the layer computes with, in `dtype` (a fresh tensor)."""
        # float16 cannot hold the small scales (amax / 448 is often below its normal range, 6e-5):
        # rescale in bf16, whose rounding (2^-9) is far below float8's (2^-4), then cast.
        work = torch.bfloat16 if dtype == torch.float16 else dtype
        scale = self.weight_scale.to(work)[:, None]
        if self.weight.dtype == work:  # someone cast the module: never scale the stored weight in place
            weight = self.weight * scale
        else:
            weight = self.weight.to(work).mul_(scale)
        return weight.to(dtype)

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        bias = None if self.bias is None else self.bias.to(dtype)
        return F.linear(x, self.dequantized_weight(dtype), bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, weight={self.weight.dtype} with per-channel scale"


def default_fp8_filter(name: str, module: nn.Module) -> bool:
    """Which Linears are stored in fp8: every Linear inside transformer_blocks."""
    return isinstance(module, nn.Linear) and name.startswith(BLOCKS_PREFIX)


def fp8_target_names(model: nn.Module, include: Callable[[str, nn.Module], bool] = default_fp8_filter) -> list[str]:
    return [name for name, m in model.named_modules() if include(name, m) and not isinstance(m, Fp8Linear)]


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def _cast_rest(model: nn.Module, compute_dtype: torch.dtype) -> None:
    """Cast the floating parameters and buffers outside Fp8Linear layers to compute_dtype, one at a time."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, Fp8Linear):
                continue
            for key, param in list(module._parameters.items()):
                if param is not None and param.is_floating_point() and param.dtype != compute_dtype:
                    module._parameters[key] = nn.Parameter(param.detach().to(compute_dtype), requires_grad=False)
            for key, buf in list(module._buffers.items()):
                if buf is not None and buf.is_floating_point() and buf.dtype != compute_dtype:
                    module._buffers[key] = buf.to(compute_dtype)


def quantize_to_fp8(model: nn.Module, compute_dtype: torch.dtype = torch.bfloat16, *,
                    include: Callable[[str, nn.Module], bool] = default_fp8_filter) -> nn.Module:
    """Replace the targeted Linears of `model` by Fp8Linear in place, layer by layer; returns `model`.

    The rest of the model is cast to `compute_dtype`. Works on a loaded model (peak memory: the model
    plus one layer's temporaries) and on a model built on the meta device (structure only, to be
    filled by `load_fp8_weights_into` or used to count bytes). A LoRA set by `lora.set_loras`
    moves to the replacing layer unchanged.
    """
    require_fp8()
    for name in fp8_target_names(model, include):
        old = model.get_submodule(name)
        new = Fp8Linear.from_linear(old, compute_dtype)
        move_lora(old, new)
        _set_submodule(model, name, new)
    _cast_rest(model, compute_dtype)
    return model


def fp8_transform(model: nn.Module,
                  compute_dtype: torch.dtype) -> Callable[[str, Tensor], Iterator[tuple[str, Tensor]]]:
    """A per-tensor hook for `load_weights_into`: quantise the weights of the model's Fp8Linear layers as
    they are read (emitting `weight` and `weight_scale`), cast every other floating tensor to compute_dtype."""
    fp8_layers = {name for name, m in model.named_modules() if isinstance(m, Fp8Linear)}

    def transform(name: str, tensor: Tensor) -> Iterator[tuple[str, Tensor]]:
        layer, _, leaf = name.rpartition(".")
        if layer in fp8_layers and leaf == "weight":
            q, scale = quantize_weight(tensor)
            yield name, q
            yield f"{layer}.weight_scale", scale
        elif tensor.is_floating_point():
            yield name, tensor.to(compute_dtype)
        else:
            yield name, tensor

    return transform


def load_fp8_weights_into(model: nn.Module, paths: tuple[Path, ...], *, dtype: torch.dtype,
                          device: torch.device | str = "cpu",
                          include: Callable[[str, nn.Module], bool] = default_fp8_filter) -> nn.Module:
    """Fill a meta-device model from safetensors with fp8 storage, quantising tensor by tensor as read.

    Peak memory stays near the fp8 size of the model plus one tensor in the file's dtype (and its
    float32 temporaries while quantising), never a full bf16/fp32 copy. `dtype` is the compute dtype.
    benchmarks/fp8_storage.py measures it: peak RSS 0.55-0.7x of a 1 GB bf16 file for a 0.5x model,
    the rest being malloc's slack from the freed per-tensor buffers (about 0.1 GB, not growing with size).
    """
    from .loading import load_weights_into

    quantize_to_fp8(model, dtype, include=include)
    return load_weights_into(model, paths, dtype=dtype, device=device, transform=fp8_transform(model, dtype))


def weight_bytes(module: nn.Module) -> int:
    """Bytes held by a module's parameters and buffers (counted from shapes: meta tensors work too)."""
    tensors: Iterable[Tensor] = list(module.parameters()) + list(module.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)
