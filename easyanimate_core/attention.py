"""Attention backends of the V5 transformer: one joint softmax attention per block, no mask, not causal.

    set_attention_backend(transformer, "flash")   # checked now: raises if it cannot run here
    transformer.attention_backend                 # -> "flash"

Every backend is called as `fn(q, k, v)` with q, k, v shaped [batch, heads, tokens, head_dim] (SDPA's
order) and returns that shape; strides may be anything with a contiguous last dim. The transformer
passes, on CUDA (and any non-CPU device), transposed views of [batch, tokens, heads, head_dim] memory,
the order its projections produce, and views the output as [batch, tokens, heads * head_dim] (free when
its memory is in token order). Scale 1/sqrt(head_dim), no mask, not causal.

- "sdpa" (default): torch.nn.functional.scaled_dot_product_attention, any device and dtype; PyTorch
  picks the kernel (CUDA fp16/bf16: FlashAttention-2 or memory-efficient; CPU: its flash kernel).
- "flash": `flash_attn.flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, ...)`
  of the `flash-attn` package (FlashAttention 2), CUDA only, fp16/bf16, head_dim <= 256, Ampere or newer.
  Its layout is [B, L, heads, d]: q, k, v go in as `.transpose(1, 2)` views (contiguous given the
  transformer's memory order; it copies only a tensor whose last dim is strided) and its
  [B, L, heads, d] output is returned as a transposed view.
- "sage": `sageattention.sageattn(q, k, v, tensor_layout="HND", is_causal=False, sm_scale=None, ...)`
  of the `sageattention` package, CUDA only, fp16/bf16, head_dim <= 128, sm80/86/89/90/120. Called with
  tensor_layout="NHD" ([B, L, heads, d]) on `.transpose(1, 2)` views, like flash. It quantises q and k
  to int8 (and, on sm89/90, P and V to fp8): faster, but not exact.

A backend that cannot run (package missing, CPU, float32) raises AttentionBackendError when selected,
naming what to install or change, and again if it is later called on tensors it cannot take.
"""
from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import UnsupportedRequestError

DEFAULT_BACKEND = "sdpa"
_HALF = (torch.float16, torch.bfloat16)


class AttentionBackendError(UnsupportedRequestError):
    """The selected attention backend is not installed or cannot run on this device/dtype."""


def sdpa_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """q, k, v [B, heads, L, d] -> [B, heads, L, d] through F.scaled_dot_product_attention."""
    return F.scaled_dot_product_attention(q, k, v)


def _flash_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    _check_tensors("flash", q)
    from flash_attn import flash_attn_func

    out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p=0.0, causal=False)
    return out.transpose(1, 2)


def _sage_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    _check_tensors("sage", q)
    from sageattention import sageattn

    out = sageattn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), tensor_layout="NHD", is_causal=False)
    return out.transpose(1, 2)


@dataclass(frozen=True)
class AttentionBackend:
    name: str
    fn: Callable[[Tensor, Tensor, Tensor], Tensor]
    module: str | None = None        # importable module, None = built into torch
    pip_package: str | None = None   # the distribution that provides it
    install: str | None = None       # the command that installs it
    cuda_half_only: bool = False     # CUDA tensors in float16/bfloat16 only
    max_head_dim: int | None = None
    note: str = ""

    def installed(self) -> bool:
        return self.module is None or importlib.util.find_spec(self.module) is not None

    def check(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None,
              head_dim: int | None = None) -> None:
        """Raise AttentionBackendError unless this backend can run for these tensors."""
        if not self.installed():
            note = f" {self.note}" if self.note else ""
            raise AttentionBackendError(
                f"attention backend {self.name!r} needs the Python package `{self.pip_package}` "
                f"(module `{self.module}`), which is not installed: `{self.install}`{note}, "
                "or use attention backend 'sdpa'.")
        if self.cuda_half_only:
            device = torch.device(device) if device is not None else None
            if device is not None and device.type != "cuda":
                raise AttentionBackendError(
                    f"attention backend {self.name!r} runs on CUDA GPUs only, but the model is on {device}: "
                    "move it to a CUDA device, or use attention backend 'sdpa'.")
            if dtype is not None and dtype not in _HALF:
                raise AttentionBackendError(
                    f"attention backend {self.name!r} needs float16 or bfloat16 activations, but the model computes "
                    f"in {dtype}: load it in bf16/fp16, or use attention backend 'sdpa'.")
            if device is not None and not torch.cuda.is_available():
                raise AttentionBackendError(
                    f"attention backend {self.name!r} needs a CUDA GPU, and this PyTorch sees none "
                    f"(torch {torch.__version__}, CUDA {torch.version.cuda}): use attention backend 'sdpa'.")
        if self.max_head_dim is not None and head_dim is not None and head_dim > self.max_head_dim:
            raise AttentionBackendError(
                f"attention backend {self.name!r} supports head_dim <= {self.max_head_dim}, the model has {head_dim}.")


BACKENDS: dict[str, AttentionBackend] = {
    "sdpa": AttentionBackend("sdpa", sdpa_attention),
    "flash": AttentionBackend("flash", _flash_attention, "flash_attn", "flash-attn",
                              "pip install flash-attn --no-build-isolation", cuda_half_only=True, max_head_dim=256,
                              note="(it compiles against the installed torch and CUDA, or use a prebuilt wheel "
                                   "matching them; Ampere or newer GPUs)"),
    "sage": AttentionBackend("sage", _sage_attention, "sageattention", "sageattention", "pip install sageattention",
                             cuda_half_only=True, max_head_dim=128),
}


def get_attention_backend(name: str) -> AttentionBackend:
    try:
        return BACKENDS[name]
    except KeyError:
        raise AttentionBackendError(
            f"unknown attention backend {name!r}; choose one of {', '.join(sorted(BACKENDS))}") from None


def available_attention_backends() -> list[str]:
    """Names of the backends whose package is installed (device/dtype not checked)."""
    return [name for name, b in BACKENDS.items() if b.installed()]


def _check_tensors(name: str, q: Tensor) -> None:
    # Cheap attribute checks only (no device sync): the call-time guard for a model moved or cast after selection.
    if q.device.type != "cuda" or q.dtype not in _HALF:
        BACKENDS[name].check(q.device, q.dtype)


def set_attention_backend(transformer: nn.Module, name: str = DEFAULT_BACKEND,
                          device: torch.device | str | None = None) -> None:
    """Make every block of `transformer` use attention backend `name` ("sdpa", "flash" or "sage").

    Checks up front that the backend's package is installed and importable and that it can run on
    `device` (default: where the weights are now; pass the GPU when they stay offloaded on the CPU
    until sampling) with the model's compute dtype; raises AttentionBackendError (a ValueError)
    otherwise, leaving the previous backend in place. The backend also checks the tensors it gets at
    each call (device and dtype only, no sync).
    """
    backend = get_attention_backend(name)
    if device is None:
        param = next(transformer.parameters(), None)
        device = param.device if param is not None and param.device.type != "meta" else None
    dtype = getattr(transformer, "compute_dtype", None)
    head_dim = getattr(getattr(transformer, "config", None), "attention_head_dim", None)
    backend.check(device, dtype, head_dim)
    if backend.module is not None:
        try:
            importlib.import_module(backend.module)
        except Exception as exc:  # installed but broken (ABI mismatch with this torch, no CUDA ...)
            raise AttentionBackendError(
                f"attention backend {name!r}: `import {backend.module}` failed ({type(exc).__name__}: {exc}). "
                f"Reinstall `{backend.pip_package}` for this torch/CUDA, or use attention backend 'sdpa'.") from exc
    for module in transformer.modules():
        if hasattr(module, "attention_fn"):
            module.attention_fn = backend.fn
    transformer.attention_backend = name
