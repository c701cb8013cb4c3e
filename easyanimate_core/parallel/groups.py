"""Process groups for a ParallelSpec inside an initialised torch.distributed world.

Rank layout: rank = cfg_index * ulysses + ulysses_index. The ranks of one Ulysses group are
consecutive (on one machine they are neighbouring GPUs, where the fast links are); the two CFG
groups hold the same Ulysses index on each side.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from .spec import ParallelError, ParallelSpec, parse_parallel


@dataclass
class ParallelGroups:
    """This rank's place in the layout and the groups it talks in."""

    spec: ParallelSpec
    rank: int
    world_size: int
    backend: str
    ulysses_group: object   # ProcessGroup of this rank's Ulysses ranks
    ulysses_rank: int
    cfg_group: object       # ProcessGroup of this rank and its twin in the other CFG half (None if cfg=1)
    cfg_rank: int           # 0: unconditional half, 1: conditional half

    @property
    def is_driver(self) -> bool:
        """Rank 0 encodes the prompt, prepares the conditioning, decodes and writes the video."""
        return self.rank == 0


def check_backend(backend: str, device: torch.device) -> None:
    """Refuse a backend that cannot carry `device` tensors, saying what to use instead."""
    device = torch.device(device)
    if backend == "nccl":
        if not dist.is_nccl_available():
            raise ParallelError("the NCCL backend is not available in this PyTorch build (CPU-only or no NCCL): "
                                "use backend 'gloo' (CPU) or install a CUDA build of PyTorch.")
        if device.type != "cuda" or not torch.cuda.is_available():
            raise ParallelError(f"the NCCL backend needs CUDA GPUs, but the model runs on {device}"
                                f"{'' if torch.cuda.is_available() else ' and this machine has no CUDA GPU'}: "
                                "use backend 'gloo' for CPU runs.")
    elif backend == "gloo" and device.type not in ("cpu",):
        # gloo does carry CUDA tensors for some collectives only (no all_to_all on CUDA): keep it to the CPU.
        raise ParallelError(f"the gloo backend is for CPU runs; the model is on {device}: use backend 'nccl'.")


def default_backend(device) -> str:
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def init_distributed(device=None, backend: str | None = None, timeout_s: float = 1800) -> torch.device:
    """Initialise the default process group from torchrun's environment (RANK, WORLD_SIZE, MASTER_*),
    unless it already is, and return this rank's device (cuda:LOCAL_RANK on GPUs)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            raise ParallelError("--parallel needs a torch.distributed launch: run through "
                                "`torchrun --nproc-per-node N -m easyanimate_core generate … --parallel …`")
        backend = backend or default_backend(device)
        check_backend(backend, device)
        kwargs = {"device_id": device} if backend == "nccl" else {}
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s), **kwargs)
    else:
        check_backend(dist.get_backend(), device)
    return device


def make_groups(spec, heads: int | None = None) -> ParallelGroups:
    """Build the Ulysses and CFG groups of `spec` in the initialised default group (collective: every
    rank calls it, in the same order). Checks the world size and, given `heads`, the Ulysses degree."""
    spec = parse_parallel(spec)
    if heads is not None:
        spec.check_heads(heads)
    if not dist.is_available() or not dist.is_initialized():
        raise ParallelError("parallel sampling needs an initialised torch.distributed process group "
                            "(torch.distributed.init_process_group on every rank, or launch with torchrun)")
    world, rank = dist.get_world_size(), dist.get_rank()
    spec.check_world(world)
    ulysses_groups = [dist.new_group(list(range(c * spec.ulysses, (c + 1) * spec.ulysses)))
                      for c in range(spec.cfg)]
    cfg_groups = ([dist.new_group([u, spec.ulysses + u]) for u in range(spec.ulysses)] if spec.cfg > 1 else [])
    cfg_index, ulysses_index = divmod(rank, spec.ulysses)
    return ParallelGroups(spec=spec, rank=rank, world_size=world, backend=str(dist.get_backend()),
                          ulysses_group=ulysses_groups[cfg_index], ulysses_rank=ulysses_index,
                          cfg_group=cfg_groups[ulysses_index] if cfg_groups else None, cfg_rank=cfg_index)
