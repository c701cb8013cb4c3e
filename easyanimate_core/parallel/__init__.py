"""Multi-GPU sampling on torch.distributed: Ulysses sequence parallelism × CFG parallelism.

    torchrun --nproc-per-node 4 -m easyanimate_core generate … --parallel ulysses=2,cfg=2

or, inside an initialised process group, `load_pipeline(folder, device=…, parallel="ulysses=2,cfg=2")`
on every rank, then the same `generate(...)` call on every rank (rank 0 gets the frames).
"""
from .groups import ParallelGroups, init_distributed, make_groups
from .pipeline import ParallelPipeline
from .spec import ParallelError, ParallelSpec, parse_parallel

__all__ = ["ParallelGroups", "ParallelPipeline", "ParallelError", "ParallelSpec", "init_distributed", "make_groups",
           "parse_parallel"]
