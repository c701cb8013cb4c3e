"""The collectives the parallel transformer needs, working on every torch.distributed backend.

all_to_all: `dist.all_to_all_single` where the backend has it (NCCL, and gloo in the PyTorch versions
this pack supports, checked at first use); otherwise an all_gather of every rank's whole send buffer,
from which each rank keeps its own slice (N times the traffic, same result). The path taken per
backend is in `ALL_TO_ALL_PATH` after first use; EASYANIMATE_ALL_TO_ALL=gather forces the fallback.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

ALL_TO_ALL_PATH: dict[str, str] = {}  # backend name -> "all_to_all_single" or "all_gather"


def _backend(group) -> str:
    return str(dist.get_backend(group))


def all_to_all(send: torch.Tensor, group) -> torch.Tensor:
    """send [N, ...] (chunk j goes to rank j of `group`) -> recv [N, ...] (chunk i came from rank i)."""
    send = send.contiguous()
    backend = _backend(group)
    path = ALL_TO_ALL_PATH.get(backend)
    if path is None:
        path = "all_gather" if os.environ.get("EASYANIMATE_ALL_TO_ALL") == "gather" else "all_to_all_single"
    if path == "all_to_all_single":
        recv = torch.empty_like(send)
        try:
            dist.all_to_all_single(recv, send, group=group)
            ALL_TO_ALL_PATH[backend] = path
            return recv
        except (RuntimeError, NotImplementedError) as exc:
            if backend in ALL_TO_ALL_PATH or "support" not in str(exc).lower():
                raise  # worked before, or a real failure (a dead peer): not a missing feature
            path = "all_gather"
    ALL_TO_ALL_PATH[backend] = path
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    gathered = torch.empty((size,) + tuple(send.shape), dtype=send.dtype, device=send.device)
    dist.all_gather_into_tensor(gathered, send, group=group) if _has_gather_into(backend) else \
        dist.all_gather(list(gathered.unbind(0)), send, group=group)
    return gathered[:, rank].contiguous()


def _has_gather_into(backend: str) -> bool:
    return backend == "nccl"


def all_gather_cat(tensor: torch.Tensor, group, dim: int = 0) -> torch.Tensor:
    """Concatenate every rank's equally shaped `tensor` along `dim`, in rank order."""
    tensor = tensor.contiguous()
    size = dist.get_world_size(group)
    gathered = torch.empty((size,) + tuple(tensor.shape), dtype=tensor.dtype, device=tensor.device)
    if _has_gather_into(_backend(group)):
        dist.all_gather_into_tensor(gathered, tensor, group=group)
    else:
        dist.all_gather(list(gathered.unbind(0)), tensor, group=group)
    return torch.cat(gathered.unbind(0), dim=dim) if dim != 0 or tensor.dim() == 0 else gathered.flatten(0, 1)
