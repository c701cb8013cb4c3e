"""CFG parallelism through the `model_fn` seam of Pipeline.denoise.

A guided step calls the transformer on a batch of two, [unconditional ; conditional]. With cfg=2 the
ranks of CFG half 0 compute the unconditional prediction and those of half 1 the conditional one,
each a batch of one; the two halves are exchanged (an all_gather within each pair of twin ranks) so
every rank holds the whole batch-of-two prediction and steps the scheduler identically.
"""
from __future__ import annotations

from ..pipeline import call_transformer
from ..text import PromptEmbeds
from .comm import all_gather_cat


class CfgModelFn:
    """model_fn(transformer, model_in, timestep, text, inpaint, control) -> prediction, split over CFG halves."""

    def __init__(self, group, rank: int, inner=call_transformer):
        self.group, self.rank, self.inner = group, rank, inner

    def __call__(self, transformer, model_in, timestep, text: PromptEmbeds, inpaint, control):
        if model_in.shape[0] != 2:  # unguided (guidance ≤ 1): both halves compute the same single batch
            return self.inner(transformer, model_in, timestep, text, inpaint, control)
        half = slice(self.rank, self.rank + 1)

        def pick(t):
            return None if t is None else t[half]

        pred = self.inner(transformer, model_in[half], timestep[half], PromptEmbeds(text.bert[half], text.t5[half]),
                          pick(inpaint), pick(control))
        return all_gather_cat(pred, self.group, dim=0)
