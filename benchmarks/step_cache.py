"""Step-cache quality/speed curve on the trained test model: per policy and threshold, the fraction of transformer
passes skipped, the relative L2 of the final latents and the PSNR of the decoded frames against the uncached run
(same prompt, seed and settings), and the wall-time ratio of the denoise loop, all measured in this run.

    .venv/bin/python benchmarks/step_cache.py                      # the full curve (CPU, a few minutes)
    .venv/bin/python benchmarks/step_cache.py --steps 10 --prompts "a red circle moving left" --thresholds 0.1

The trained model (tests/assets/trained_tiny, see its README) has a smooth denoising trajectory, unlike random
tiny models, so these numbers mean something; its TeaCache coefficients are its own calibration
(step_cache.json, from `python -m easyanimate_core calibrate-cache` on other prompts).
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from easyanimate_core import load_pipeline  # noqa: E402
from easyanimate_core.cache import CacheSettings  # noqa: E402

DEFAULT_MODEL = REPO / "tests" / "assets" / "trained_tiny"
DEFAULT_PROMPTS = ("a red circle moving left", "a blue square moving down", "a yellow triangle moving right",
                   "a white circle moving up")
DEFAULT_THRESHOLDS = {"teacache": (0.05, 0.1, 0.15, 0.2, 0.3), "auto": (0.05, 0.1, 0.15, 0.2, 0.3)}


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float((a.float() - b.float()).square().mean())
    return float("inf") if mse == 0 else 10 * math.log10(1.0 / mse)


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def run_once(pipe, prompt, seed, args, cache):
    """(final latents, decoded frames, denoise seconds, stats) of one generation."""
    prepared = pipe.prepare(height=args.size, width=args.size, num_frames=args.frames, num_inference_steps=args.steps,
                            sampler=args.sampler, seed=seed)
    positive, negative = pipe.encode_prompt(prompt), pipe.encode_prompt("")
    start = time.perf_counter()
    latents = pipe.denoise(prepared, positive, negative, args.cfg, cache=cache)
    seconds = time.perf_counter() - start
    return latents.cpu(), pipe.decode(latents), seconds, pipe.last_cache_stats


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--prompts", nargs="+", default=list(DEFAULT_PROMPTS))
    parser.add_argument("--policies", nargs="+", default=["teacache", "auto"], choices=["teacache", "auto"])
    parser.add_argument("--thresholds", nargs="+", type=float, default=None,
                        help="thresholds for every policy (default: a curve per policy)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--frames", type=int, default=9)
    parser.add_argument("--cfg", type=float, default=6.0)
    parser.add_argument("--sampler", default="DDIM")
    parser.add_argument("--start", type=float, default=0.1)
    parser.add_argument("--end", type=float, default=0.9)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None, help="also write the table (markdown) here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    pipe = load_pipeline(args.model)
    seeds = [100 + i for i in range(len(args.prompts))]
    run_once(pipe, args.prompts[0], seeds[0], args, None)  # warm-up: allocator, RoPE tables, prompt cache
    reference = [run_once(pipe, p, s, args, None) for p, s in zip(args.prompts, seeds)]
    lines = [f"Step cache on {args.model.name}: {len(args.prompts)} prompts, {args.steps} {args.sampler} steps, "
             f"cfg {args.cfg:g}, {args.size}x{args.size}x{args.frames}, skip window {args.start:g}–{args.end:g}; "
             "each row vs the uncached run of the same prompt and seed (time: denoise loop, sum over prompts).",
             "",
             "| policy | threshold | passes skipped | latents rel L2 | PSNR mean (min) dB | time ratio |",
             "|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    base_seconds = sum(r[2] for r in reference)
    for policy in args.policies:
        for threshold in args.thresholds or DEFAULT_THRESHOLDS[policy]:
            settings = CacheSettings(policy, threshold, args.start, args.end)
            runs = [run_once(pipe, p, s, args, settings) for p, s in zip(args.prompts, seeds)]
            skipped = sum(r[3].skipped for r in runs) / sum(r[3].passes for r in runs)
            rel = statistics.mean(rel_l2(r[0], ref[0]) for r, ref in zip(runs, reference))
            psnrs = [psnr(r[1], ref[1]) for r, ref in zip(runs, reference)]
            ratio = sum(r[2] for r in runs) / base_seconds
            row = (f"| {policy} | {threshold:g} | {skipped:.0%} | {rel:.4f} | {statistics.mean(psnrs):.1f} "
                   f"({min(psnrs):.1f}) | {ratio:.2f} |")
            lines.append(row)
            print(row, flush=True)
    if args.out:
        args.out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
