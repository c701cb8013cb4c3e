"""Ulysses sequence parallelism of the V5 transformer over one process group of N ranks.

Each rank holds S = ceil(Lv / N) of the Lv video tokens (rank r: tokens r*S … r*S+S-1; the last
ranks' shards are padded with zero tokens when N does not divide Lv) and all Lt text tokens. Everything
per token (modulation, q/k/v projections, qk-norm, RoPE on the rank's slice of the tables, output
projections, feed-forward) runs locally on the shard. Around the one joint attention per block:

1. an all-to-all trades the sequence split for a head split: rank r sends heads j*H/N… of its video
   q/k/v to rank j and gets back all N*S video tokens of its own H/N heads; the padding tokens are
   dropped here, and the rank's heads of the (replicated) text q/k/v go in front, so attention sees
   exactly the single-process [text ; video] sequence for those heads (the joint attention has no
   mask: padding must never reach it);
2. attention runs on whole sequences for H/N heads;
3. a second all-to-all sends each rank its video tokens back with all heads, and the text output of
   every rank's heads (each rank updates its own copy of the text stream, so all copies stay equal).

Installed through the transformer's `blocks_runner` seam (shard x and the RoPE tables on entry, gather
on exit) and the blocks' `attention_fn` (wrapped for the duration of the call, then restored).
"""
from __future__ import annotations

import math
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor

from ..models.rope import RopeTables
from .comm import all_gather_cat, all_to_all


def shard_bounds(length: int, size: int, rank: int) -> tuple[int, int, int]:
    """(start, stop, shard) of rank `rank`'s real tokens among `length` split over `size` equal shards."""
    shard = math.ceil(length / size)
    start = min(rank * shard, length)
    return start, min(start + shard, length), shard


def _shard_rows(t: Tensor, dim: int, start: int, stop: int, shard: int) -> Tensor:
    """Rows start:stop of `t` along `dim`, zero-padded at the end to `shard` rows."""
    piece = t.narrow(dim, start, stop - start)
    missing = shard - (stop - start)
    if missing == 0:
        return piece
    pad = [0, 0] * (t.dim() - 1 - dim % t.dim()) + [0, missing]
    return F.pad(piece, pad)


def shard_rope(rope: RopeTables, start: int, stop: int, shard: int) -> RopeTables:
    """This rank's rows of the RoPE tables (padding rows are zeros: they rotate padding tokens only)."""
    return RopeTables(*(None if t is None else _shard_rows(t, 0, start, stop, shard) for t in rope))


class UlyssesAttention:
    """An `attention_fn` (q, k, v [B, H, Lt + S, d] → [B, H, Lt + S, d]) doing steps 1–3 around `inner`."""

    def __init__(self, inner, group, size: int, rank: int, video_len: int, shard: int):
        self.inner, self.group, self.size, self.rank = inner, group, size, rank
        self.video_len, self.shard = video_len, shard

    def __call__(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        batch, heads, length, dim = q.shape
        n, shard = self.size, self.shard
        text_len, local_heads = length - shard, heads // n
        own = slice(self.rank * local_heads, (self.rank + 1) * local_heads)
        # send[j, 0..2] = heads of rank j, this rank's video tokens: [N, 3, B, H/N, S, d]
        send = torch.stack([t[:, :, text_len:].unflatten(1, (n, local_heads)).transpose(0, 1) for t in (q, k, v)], 1)
        recv = all_to_all(send, self.group)  # [N (source's token shard), 3, B, H/N, S, d]
        joint = q.new_empty(3, batch, local_heads, text_len + self.video_len, dim)
        for i, t in enumerate((q, k, v)):
            joint[i, :, :, :text_len] = t[:, own, :text_len]
        video = recv.permute(1, 2, 3, 0, 4, 5).flatten(3, 4)  # [3, B, H/N, N*S, d], padding at the end
        joint[:, :, :, text_len:] = video[:, :, :, :self.video_len]
        out = self.inner(joint[0], joint[1], joint[2])  # [B, H/N, Lt + Lv, d]

        # back[j] = text output (all of it) + rank j's video tokens, for this rank's heads
        back = out.new_zeros(n, batch, local_heads, text_len + shard, dim)
        back[:, :, :, :text_len] = out[:, :, :text_len]
        video_out = out[:, :, text_len:]
        for j in range(n):
            start, stop, _ = shard_bounds(self.video_len, n, j)
            back[j, :, :, text_len:text_len + stop - start] = video_out[:, :, start:stop]
        got = all_to_all(back, self.group)  # [N (source's heads), B, H/N, Lt + S, d]
        # token-major memory [B, Lt + S, H, d], returned as a [B, H, Lt + S, d] view (the block flattens heads)
        return got.permute(1, 3, 0, 2, 4).reshape(batch, length, heads, dim).transpose(1, 2)


class UlyssesRunner:
    """A `blocks_runner`: runs the block stack on this rank's shard of the video tokens (see module doc)."""

    def __init__(self, group, size: int, rank: int, inner=None):
        self.group, self.size, self.rank = group, size, rank
        self.inner = inner  # a blocks_runner that was set before (a step cache...), run on the shard

    def __call__(self, transformer, x: Tensor, ctx: Tensor, temb: Tensor, rope: RopeTables) -> Tensor:
        video_len = x.shape[1]
        start, stop, shard = shard_bounds(video_len, self.size, self.rank)
        x_local = _shard_rows(x, 1, start, stop, shard)
        rope_local = shard_rope(rope, start, stop, shard)
        with wrapped_attention(transformer, lambda inner: UlyssesAttention(inner, self.group, self.size, self.rank,
                                                                            video_len, shard)):
            if self.inner is None:
                x_local = transformer.run_blocks(x_local, ctx, temb, rope_local)
            else:
                x_local = self.inner(transformer, x_local, ctx, temb, rope_local)
        return all_gather_cat(x_local, self.group, dim=1)[:, :video_len]


@contextmanager
def wrapped_attention(transformer, wrap):
    """Every block's attention_fn replaced by wrap(attention_fn) inside the context, restored after."""
    blocks = list(transformer.transformer_blocks)
    saved = [block.attention_fn for block in blocks]
    try:
        for block, fn in zip(blocks, saved):
            block.attention_fn = wrap(fn)
        yield
    finally:
        for block, fn in zip(blocks, saved):
            block.attention_fn = fn
