"""Gradient checkpointing per transformer block, through the transformer's `blocks_runner` seam.

Each block's activations are dropped after its forward and recomputed during the backward, so the
activation memory of a training step is one block's plus the block inputs (x, ctx) of every block.
Block swap (block_swap.py) composes with it: the recomputation calls the block again, whose hooks
copy its weights back in for exactly that block's backward.
"""
from __future__ import annotations

from contextlib import contextmanager

from torch.utils.checkpoint import checkpoint


def checkpointed_runner(transformer, x, ctx, temb, rope):
    """A `blocks_runner`: run_blocks with every block under torch.utils.checkpoint (non-reentrant)."""
    for block in transformer.transformer_blocks:
        x, ctx = checkpoint(block, x, ctx, temb, rope, use_reentrant=False)
    return x


@contextmanager
def blocks_runner(transformer, runner):
    """Install `runner` as the transformer's blocks_runner for the `with` body (None: leave it as is)."""
    if runner is None:
        yield
        return
    previous = transformer.blocks_runner
    transformer.blocks_runner = runner
    try:
        yield
    finally:
        transformer.blocks_runner = previous
