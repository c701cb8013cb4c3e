"""Put a transformer under a parallel layout for a while: Ulysses runner installed, CFG model_fn built."""
from __future__ import annotations

from contextlib import contextmanager

from ..pipeline import call_transformer
from .cfg import CfgModelFn
from .groups import ParallelGroups
from .ulysses import UlyssesRunner


@contextmanager
def split_transformer(transformer, groups: ParallelGroups, model_fn=None):
    """Yield the model_fn to call the transformer with under `groups` (CFG split when cfg=2, around
    `model_fn` or the plain call); the Ulysses runner is the transformer's blocks_runner meanwhile
    (around any runner set before), and the previous runner is back afterwards, also on errors."""
    spec = groups.spec
    inner = model_fn or call_transformer
    fn = CfgModelFn(groups.cfg_group, groups.cfg_rank, inner=inner) if spec.cfg > 1 else inner
    previous = transformer.blocks_runner
    if spec.ulysses > 1:
        transformer.blocks_runner = UlyssesRunner(groups.ulysses_group, spec.ulysses, groups.ulysses_rank,
                                                  inner=previous)
    try:
        yield fn
    finally:
        transformer.blocks_runner = previous
