"""Long videos on a small model (CPU): memory against length, cost of continuing, windows, seams.

    python benchmarks/long_video.py [--model DIR] [--height 32 --width 48] [--steps 2] [--lengths 49,145,289]
    python benchmarks/long_video.py --only time,windows,seams      # skip the memory runs

Defaults: the tiny InP model of ../shared/golden (random weights), 32x48, 2 steps, chunks of 49
frames overlapping by 4. Every figure is a ratio against a reference measured in the same run:

- memory: each length runs in a fresh process (continue, then windows) that loads the model and runs
  one chunk first; the peak is the process's peak resident size during generate_long (VmHWM, reset
  through /proc/self/clear_refs just before). "growth beyond the frames" = (peak − the first length's
  peak − the extra output frames' bytes) / the first length's peak: what a longer video costs beyond
  its own frames ([F,H,W,3] float32); the target is ≤ 10 %.
- time: seconds per output frame of a 145-frame continuation vs three independent 49-frame runs,
  with where the time went (transformer, VAE encode of the handed-over frames, VAE decode).
  On the tiny model the VAE dominates; on 12B the transformer does (see the README).
- windows: transformer passes per step vs the number of windows, for two overlaps.
- seams: mean |frame(i+1) − frame(i)| over the pairs touching a chunk's cross-fade vs all other pairs
  (random weights: a check of the stitching, not of quality).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = REPO.parent / "shared" / "golden" / "models" / "EasyAnimateV5-tiny-zh-InP"
PROMPT = "a woman in a white dress walking through a forest, high quality"

MEMORY_CHILD = r"""
import json, sys, torch
sys.path.insert(0, {repo!r})
from easyanimate_core import load_pipeline

def status(key):
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key + ":"))

torch.set_num_threads({threads})
pipe = load_pipeline({model!r})
kw = dict(height={height}, width={width}, chunk_frames={chunk}, overlap_frames={overlap}, num_inference_steps={steps})
pipe.generate_long({prompt!r}, num_frames={chunk}, mode={mode!r}, **kw)  # warm up kernels, allocator, prompt cache
open("/proc/self/clear_refs", "w").write("5")
before = status("VmRSS")
out = pipe.generate_long({prompt!r}, num_frames={frames}, mode={mode!r}, **kw)
peak = status("VmHWM")
print(json.dumps({{"before": before, "peak": peak, "frames": out.frames.shape[0],
                   "frame_bytes": out.frames.numel() * out.frames.element_size()}}))
"""


def mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def memory(args) -> None:
    print(f"\n## Peak RSS of generate_long by length ({args.height}x{args.width}, chunk {args.chunk}, "
          f"overlap {args.overlap}, {args.steps} steps; model loaded and one chunk run before)\n")
    print("| mode | requested | made | peak RSS | frames | peak − first peak | frames − first frames | "
          "growth beyond the frames |")
    print("|---|---|---|---|---|---|---|---|")
    for mode in ("continue", "windows"):
        first = None
        for frames in args.lengths:
            code = MEMORY_CHILD.format(repo=str(REPO), threads=args.threads, model=str(args.model),
                                       height=args.height, width=args.width, chunk=args.chunk, overlap=args.overlap,
                                       steps=args.steps, prompt=PROMPT, mode=mode, frames=frames)
            done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
            if done.returncode:
                raise SystemExit(done.stderr[-3000:])
            r = json.loads(done.stdout.strip().splitlines()[-1])
            first = r if first is None else first
            grown, more_frames = r["peak"] - first["peak"], r["frame_bytes"] - first["frame_bytes"]
            print(f"| {mode} | {frames} | {r['frames']} | {mib(r['peak'])} | {mib(r['frame_bytes'])} | {mib(grown)} | "
                  f"{mib(more_frames)} | {(grown - more_frames) / first['peak']:+.1%} |", flush=True)


def timed_pipeline(pipe) -> dict:
    """Wrap the pipeline's stages on this instance to add up seconds per stage."""
    spent = {"denoise": 0.0, "encode": 0.0, "decode": 0.0}

    def wrap(name, key):
        original = getattr(pipe, name)

        def timed(*a, **k):
            began = time.perf_counter()
            try:
                return original(*a, **k)
            finally:
                spent[key] += time.perf_counter() - began
        setattr(pipe, name, timed)

    wrap("denoise", "denoise")
    wrap("_encode", "encode")
    wrap("decode", "decode")
    return spent


def time_and_seams(args, pipe) -> None:
    import torch

    kw = dict(height=args.height, width=args.width, num_inference_steps=args.steps)
    pipe.generate(PROMPT, num_frames=args.chunk, **kw)  # warm-up
    spent = timed_pipeline(pipe)
    began = time.perf_counter()
    for seed in range(3):
        pipe.generate(PROMPT, num_frames=args.chunk, seed=seed, **kw)
    separate = time.perf_counter() - began
    separate_stages = dict(spent)
    spent.update(denoise=0.0, encode=0.0, decode=0.0)
    began = time.perf_counter()
    long = pipe.generate_long(PROMPT, num_frames=args.long_frames, chunk_frames=args.chunk, overlap_frames=args.overlap, **kw)
    continued = time.perf_counter() - began
    made = long.frames.shape[0]
    per_separate, per_long = separate / (3 * args.chunk), continued / made
    print(f"\n## Time: a {args.long_frames}-frame continuation vs three independent {args.chunk}-frame runs "
          f"({args.height}x{args.width}, {args.steps} steps)\n")
    print("| run | frames | seconds | s/frame | transformer (denoise) | VAE encode | VAE decode |")
    print("|---|---|---|---|---|---|---|")
    print(f"| 3 × {args.chunk} independent | {3 * args.chunk} | {separate:.2f} | {per_separate:.4f} | "
          f"{separate_stages['denoise']:.2f} | {separate_stages['encode']:.2f} | {separate_stages['decode']:.2f} |")
    print(f"| continue {args.long_frames} ({len(long.chunks)} chunks) | {made} | {continued:.2f} | {per_long:.4f} | "
          f"{spent['denoise']:.2f} | {spent['encode']:.2f} | {spent['decode']:.2f} |")
    print(f"\ns/frame ratio continue / independent: {per_long / per_separate:.3f}; the handed-over frames' VAE "
          f"encode is {spent['encode'] / continued:.1%} of the continuation's time on this model")

    frames = long.frames
    diffs = (frames[1:] - frames[:-1]).abs().mean(dim=(1, 2, 3))
    seam = torch.zeros(len(diffs), dtype=torch.bool)
    for chunk in long.chunks[1:]:  # pairs from the last frame before the cross-fade to the first new-only frame
        seam[max(chunk.start - 1, 0):chunk.start + chunk.known] = True
    print(f"\n## Seams ({made} frames, {len(long.chunks) - 1} seams of overlap {args.overlap})\n")
    print(f"mean |frame(i+1) − frame(i)|: at seams {diffs[seam].mean():.4f}, inside chunks {diffs[~seam].mean():.4f}, "
          f"ratio {diffs[seam].mean() / diffs[~seam].mean():.2f}")


def windows(args, pipe) -> None:
    print(f"\n## Windows: transformer passes per step vs windows ({args.long_frames} frames, window {args.chunk})\n")
    print("| overlap (frames) | windows | passes per step | passes per step / windows |")
    print("|---|---|---|---|")
    for overlap in sorted({args.overlap, min(16, args.chunk - 1)}):
        out = pipe.generate_long(PROMPT, height=args.height, width=args.width, num_frames=args.long_frames,
                                 chunk_frames=args.chunk, overlap_frames=overlap, mode="windows",
                                 num_inference_steps=args.steps)
        per_step = out.transformer_passes / args.steps
        print(f"| {overlap} | {len(out.windows)} {out.windows} | {per_step:g} | {per_step / len(out.windows):.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="an InP model folder")
    parser.add_argument("--height", type=int, default=32)
    parser.add_argument("--width", type=int, default=48)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--chunk", type=int, default=49)
    parser.add_argument("--overlap", type=int, default=4)
    parser.add_argument("--lengths", default="49,145,289", help="output lengths for the memory runs")
    parser.add_argument("--long-frames", type=int, default=145, help="length of the time/seams/windows runs")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", default="memory,time,windows,seams",
                        help="comma list of memory, time, windows, seams (seams come with time)")
    args = parser.parse_args()
    args.lengths = [int(n) for n in args.lengths.split(",")]
    parts = set(args.only.split(","))
    if not args.model.is_dir():
        raise SystemExit(f"{args.model} is not a model folder; pass --model <an EasyAnimate V5 InP folder>")

    sys.path.insert(0, str(REPO))
    import torch

    from easyanimate_core import load_pipeline

    torch.set_num_threads(args.threads)
    print(f"# Long-video benchmark: {args.model.name}")
    if "memory" in parts:
        memory(args)
    if parts & {"time", "seams", "windows"}:
        pipe = load_pipeline(args.model)
        if parts & {"time", "seams"}:
            time_and_seams(args, pipe)
        if "windows" in parts:
            windows(args, pipe)


if __name__ == "__main__":
    main()
