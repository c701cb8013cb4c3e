"""Peak memory of one VAE decode, spatially tiled vs untiled, at the same shape (CPU).

    python benchmarks/vae_tiling_memory.py [--size 512] [--frames 5] [--tile 128] [--width-scale 4]

The VAE is the V5 MagViT architecture (4 levels, 2 layers per block, spatial mid-block attention,
causal 3D convolutions, frame-wise group norm) with its channel widths divided by --width-scale
(default 4: 32/64/128/128, so the decode runs in seconds on a CPU; activation memory scales
linearly with width, so the tiled/untiled ratio is the same shape of number as for the real VAE).
Random weights, fixed seed. Each decode runs in a fresh process; the peak is the process's peak
resident size during the decode (VmHWM, reset through /proc/self/clear_refs just before) minus its
resident size just before. The decoded output itself ([1,3,F,H,W] float32) is part of both peaks
and is printed separately.

The untiled decode holds full-frame activations of the widest full-resolution block for one
temporal chunk (mini_batch_decoder = 1 latent frame → 4 pixel frames); tiling bounds that to one
tile, so the saving grows with the frame size: at 1024x1024 the real VAE's untiled chunk holds
several 1 GiB (bf16) activations, a 384 px tile about an eighth of that.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, sys, torch
sys.path.insert(0, {repo!r})
from easyanimate_core.models.vae import MagvitVAE

def status(key):
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key + ":"))

torch.manual_seed(0)
widths = [c // {scale} for c in (128, 256, 512, 512)]
vae = MagvitVAE(block_out_channels=widths, norm_num_groups=min(32, widths[0] // 2))
vae.eval()
if {tiled}:
    vae.enable_tiling({tile}, 0.25)
latent_frames = ({frames} - 1) // 4 + 1
z = torch.randn(1, 16, latent_frames, {size} // 8, {size} // 8, generator=torch.Generator().manual_seed(1))
with torch.inference_mode():
    vae.decode(z[..., :2, :2])  # warm up allocator and kernels on a tiny input
    open("/proc/self/clear_refs", "w").write("5")
    before = status("VmRSS")
    out = vae.decode(z)
    peak = status("VmHWM")
torch.save(out[:, :, :1].clone(), {sample!r})
print(json.dumps({{"before": before, "peak": peak, "output_bytes": out.numel() * out.element_size(),
                   "shape": list(out.shape)}}))
"""


def run(tiled: bool, args, sample: Path) -> dict:
    code = CHILD.format(repo=str(REPO), scale=args.width_scale, tiled=tiled, tile=args.tile, frames=args.frames,
                        size=args.size, sample=str(sample))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512, help="frame height = width in pixels")
    parser.add_argument("--frames", type=int, default=5, help="pixel frames (4k+1)")
    parser.add_argument("--tile", type=int, default=128, help="tile_sample_min_size in pixels")
    parser.add_argument("--width-scale", type=int, default=4, help="divide the real VAE's channel widths by this")
    args = parser.parse_args()

    import tempfile

    import torch

    with tempfile.TemporaryDirectory() as tmp:
        results = {}
        for tiled in (False, True):
            results[tiled] = run(tiled, args, Path(tmp) / f"{tiled}.pt")
        first = {t: torch.load(Path(tmp) / f"{t}.pt") for t in (False, True)}

    mib = 2**20
    shape = results[False]["shape"]
    print(f"VAE decode {shape[2]} frames at {args.size}x{args.size}, widths /{args.width_scale}, "
          f"tile {args.tile} px (overlap 0.25), CPU float32")
    print(f"{'':10s} {'peak increase':>14s} {'minus output':>13s}")
    for tiled in (False, True):
        r = results[tiled]
        rise = r["peak"] - r["before"]
        print(f"{'tiled' if tiled else 'untiled':10s} {rise / mib:11.1f} MiB {(rise - r['output_bytes']) / mib:9.1f} MiB")
    rise = {t: results[t]["peak"] - results[t]["before"] for t in (False, True)}
    work = {t: rise[t] - results[t]["output_bytes"] for t in (False, True)}
    print(f"ratio tiled/untiled: {rise[True] / rise[False]:.2f} (whole peak), "
          f"{work[True] / work[False]:.2f} (working memory beside the output)")
    diff = (first[True] - first[False]).abs().max().item()
    print(f"first frame max |tiled - untiled| = {diff:.3g} (random weights: the mid-block attention sees the "
          "whole frame untiled and one tile tiled, so this is not a measure of seam quality)")


if __name__ == "__main__":
    main()
