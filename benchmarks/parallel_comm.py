"""Multi-GPU sampling at 12B sizes: what each rank sends per guided step, its FLOPs, and the step time
projected on N H100s (easyanimate_core/parallel).

    python benchmarks/parallel_comm.py [--mfu 0.55] [--step-s 2.0]   # pure arithmetic, runs anywhere in < 1 s

Bytes are counted from the exact buffers the implementation exchanges (bf16 activations, fp32
predictions), per rank and per guided step (one transformer call on a CFG batch of two):
- Ulysses (N ranks): per block, an all-to-all of q/k/v of the rank's S = ceil(Lv / N) video tokens
  (3·B·H·S·d values, (N-1)/N of them leave the rank) and one back of the attention output of its H/N
  heads over text + its shard for every peer ((N-1)·B·(H/N)·(Lt+S)·d); once per call, the all_gather of
  the video tokens after the last block ((N-1)·B·S·D).
- CFG (2 groups): the all_gather of the prediction of one half (16·T·h·w fp32) per step.
FLOPs per rank: each Ulysses rank computes its S video tokens and all Lt text tokens (text is
replicated), and 1/N of the attention; a CFG half computes one of the two batch entries.

Projection (stated assumptions, change them with the flags): the single-GPU guided step takes the
compute floor (gpu_full_size.flops_per_step at 800 TFLOP/s bf16) divided by --mfu, or --step-s if
given (e.g. the s/step gpu_full_size.py measures); each rank's compute scales with its FLOPs at the
same efficiency; communication is not overlapped with compute (an upper bound), at the effective
per-GPU bandwidth of the link plus a latency per collective: NVLink 4 (H100 SXM, 450 GB/s per direction)
at 300 GB/s and 15 µs, PCIe Gen5 x16 (64 GB/s) at 25 GB/s and 40 µs (all-to-all through the host bridge,
shared by the GPUs). The ratio printed is the projected speed-up over one GPU (reference: the same
single-GPU step, computed in this run).
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from easyanimate_core.models.transformer import TransformerConfig  # noqa: E402
from gpu_full_size import H100_BF16_TFLOPS, TEXT_TOKENS, flops_per_step  # noqa: E402

SIZES = [(384, 672, 49), (768, 1344, 49)]
LAYOUTS = [(2, 1), (4, 1), (8, 1), (1, 2), (2, 2), (4, 2)]  # (ulysses, cfg)
LINKS = {"NVLink": (300e9, 15e-6), "PCIe5": (25e9, 40e-6)}
BF16, FP32 = 2, 4


def tokens(size) -> tuple[int, int, tuple[int, int, int]]:
    height, width, frames = size
    latent = ((frames - 1) // 4 + 1, height // 8, width // 8)
    return latent[0] * (height // 16) * (width // 16), sum(TEXT_TOKENS), latent


def per_rank(config: TransformerConfig, size, ulysses: int, cfg: int) -> dict:
    """Bytes sent, collectives and FLOPs of one rank for one guided step."""
    video, text, latent = tokens(size)
    n, heads, d, dim = ulysses, config.num_attention_heads, config.attention_head_dim, config.inner_dim
    batch = 2 // cfg
    shard = math.ceil(video / n)
    sent = collectives = 0
    if n > 1:
        qkv = 3 * batch * heads * shard * d * (n - 1) / n
        back = (n - 1) * batch * (heads // n) * (text + shard) * d
        sent += config.num_layers * (qkv + back) * BF16 + (n - 1) * batch * shard * dim * BF16
        collectives += 2 * config.num_layers + 1
    if cfg > 1:
        sent += 16 * math.prod(latent) * FP32
        collectives += 1
    per_token = 2 * (4 * dim * dim + 2 * dim * 4 * dim)
    attention = 2 * 2 * (video + text) ** 2 * dim / n
    flops = batch * config.num_layers * ((shard + text) * per_token + attention)
    return {"bytes": sent, "collectives": collectives, "flops": flops}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mfu", type=float, default=0.55, help="single-GPU efficiency vs 800 TFLOP/s bf16")
    parser.add_argument("--step-s", type=float, default=None,
                        help="measured single-GPU s per guided step at 384x672x49 (others scale by FLOPs)")
    args = parser.parse_args(argv)
    config = TransformerConfig()  # 12B
    base_flops = flops_per_step(config, SIZES[0])
    print("12B guided step (CFG batch 2), per rank; bf16 activations; projected on H100s, comm not overlapped")
    print(f"assumed single-GPU step: {'measured --step-s' if args.step_s else f'floor / mfu {args.mfu}'}; links: "
          + ", ".join(f"{k} {bw / 1e9:.0f} GB/s + {lat * 1e6:.0f} us/collective" for k, (bw, lat) in LINKS.items()))
    header = (f"{'size':>11} {'layout':>17} {'GPUs':>4} {'GB sent/rank':>12} {'TFLOP/rank':>10} "
              f"{'bytes/FLOP':>10} {'1-GPU s':>8} " + " ".join(f"{k + ' s':>8} {k + ' x':>8}" for k in LINKS))
    print(header)
    for size in SIZES:
        total = flops_per_step(config, size)
        single = (args.step_s * total / base_flops if args.step_s
                  else total / (H100_BF16_TFLOPS * 1e12 * args.mfu))
        for ulysses, cfg in LAYOUTS:
            if config.num_attention_heads % ulysses:
                continue
            rank = per_rank(config, size, ulysses, cfg)
            compute = single * rank["flops"] / total
            cells = []
            for bandwidth, latency in LINKS.values():
                step = compute + rank["bytes"] / bandwidth + rank["collectives"] * latency
                cells.append(f"{step:8.2f} {single / step:7.2f}x")
            print(f"{'x'.join(map(str, size)):>11} {f'ulysses={ulysses},cfg={cfg}':>17} {ulysses * cfg:>4} "
                  f"{rank['bytes'] / 1e9:12.2f} {rank['flops'] / 1e12:10.1f} {rank['bytes'] / rank['flops']:10.2e} "
                  f"{single:8.2f} " + " ".join(cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
