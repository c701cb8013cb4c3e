"""Full-size 12B / 7B transformer speed and memory on one GPU, with random weights (nothing to download).

    python benchmarks/gpu_full_size.py [--out benchmarks/results/gpu.md]      # one command, < 10 minutes on an H100
    python benchmarks/gpu_full_size.py --tiny --device cpu                    # smoke run of the same code path

For each model (12B: 48 MMDiT blocks; 7B: 36 blocks, the first 18 MMDiT) in bf16 and each size
384x672x49, 576x1008x49, 768x1344x49 it times one guided step (one transformer forward on a CFG batch
of 2, the way Pipeline.denoise calls it), median of --runs after a warm-up, with CUDA events, and
records the peak VRAM of the step. For 12B at 384x672x49 it then repeats the step in each memory
mode: bf16 resident, fp8 weights, bf16 + block swap, fp8 + block swap (swap counts chosen so the
resident part is small), giving s/step and peak VRAM. Last, the V5 VAE (random weights, bf16) decodes
13 latent frames at each size, untiled and with 384 px tiles: seconds and peak VRAM.

Compared with: the compute floor (about 0.63 s per guided step for 12B at 384x672x49 at 800 TFLOP/s,
`../shared/docs/easyanimate-v5.md` §10, recomputed here from the shapes) and the original's published
3.7 s/step on an A100 at 384x672x49. The table goes to stdout and to --out (markdown).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from easyanimate_core.block_swap import enable_block_swap  # noqa: E402
from easyanimate_core.fp8 import quantize_to_fp8, weight_bytes  # noqa: E402
from easyanimate_core.models.transformer import EasyAnimateTransformer3D, TransformerConfig  # noqa: E402
from easyanimate_core.models.vae import MagvitVAE  # noqa: E402

MODELS = {
    "12B": dict(num_layers=48, mmdit_layers=48),
    "7B": dict(num_layers=36, mmdit_layers=18),
}
SIZES = [(384, 672, 49), (576, 1008, 49), (768, 1344, 49)]
TINY = dict(num_attention_heads=2, attention_head_dim=64, num_layers=2, mmdit_layers=2, time_embed_dim=64,
            text_embed_dim=32, text_embed_dim_t5=48)
TINY_SIZES = [(64, 112, 5)]
TEXT_TOKENS = (77, 256)
PUBLISHED_A100 = 3.7  # s per guided step, 12B 384x672x49, original code
H100_BF16_TFLOPS = 800


def build_transformer(overrides: dict, device: torch.device, dtype: torch.dtype, tiny: bool):
    config = TransformerConfig(in_channels=33, **({**TINY, **overrides} if tiny else overrides))
    with torch.device("meta"):
        model = EasyAnimateTransformer3D(config)
    model = model.to_empty(device=device)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.normal_(0, p[0].numel() ** -0.5)
            else:
                p.fill_(1.0) if name.endswith("weight") else p.zero_()
    return model.to(dtype).eval()


def step_inputs(config: TransformerConfig, size, device, dtype):
    height, width, frames = size
    t = (frames - 1) // 4 + 1
    g = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(device, dtype)

    bert_dim = config.text_embed_dim
    return dict(hidden_states=rand(2, 16, t, height // 8, width // 8),
                timestep=torch.full((2,), 500.0, device=device),
                encoder_hidden_states=rand(2, TEXT_TOKENS[0], bert_dim),
                encoder_hidden_states_t5=rand(2, TEXT_TOKENS[1], config.text_embed_dim_t5),
                inpaint_latents=rand(2, 17, t, height // 8, width // 8))


def flops_per_step(config: TransformerConfig, size) -> float:
    """Matmul FLOPs of one guided step (batch 2): projections, feed-forwards and attention."""
    height, width, frames = size
    video = ((frames - 1) // 4 + 1) * (height // 16) * (width // 16)
    text = sum(TEXT_TOKENS)
    d = config.inner_dim
    per_token = 2 * (4 * d * d + 2 * d * 4 * d)   # q, k, v, out + ff (in and out)
    attention = 2 * 2 * (video + text) ** 2 * d    # QK^T and PV
    return 2 * config.num_layers * ((video + text) * per_token + attention)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, runs: int) -> tuple[float, int]:
    """(median seconds, peak bytes) of fn() after one warm-up."""
    fn()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    return statistics.median(times), peak


def gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB"


def transformer_rows(args, device, lines):
    sizes = TINY_SIZES if args.tiny else SIZES
    lines += ["| model | size (HxWxF) | s / guided step | floor s | peak VRAM |", "|---|---|---|---|---|"]
    for name, overrides in MODELS.items():
        model = build_transformer(overrides, device, torch.bfloat16, args.tiny)
        for size in sizes:
            inputs = step_inputs(model.config, size, device, torch.bfloat16)
            with torch.inference_mode():
                seconds, peak = timed(lambda m=model, i=inputs: m(**i), device, args.runs)
            floor = flops_per_step(model.config, size) / (H100_BF16_TFLOPS * 1e12)
            lines.append(f"| {name} | {'x'.join(map(str, size))} | {seconds:.3f} | {floor:.3f} | {gb(peak)} |")
            print(lines[-1], flush=True)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()


def memory_mode_rows(args, device, lines):
    size = (TINY_SIZES if args.tiny else SIZES)[0]
    lines += ["", f"12B at {'x'.join(map(str, size))}, memory modes (transformer stage):", "",
              "| mode | weights on GPU | s / guided step | peak VRAM |", "|---|---|---|---|"]
    blocks = MODELS["12B"]["num_layers"] if not args.tiny else TINY["num_layers"]
    for label, fp8, swap in (("bf16, resident", False, 0), ("fp8, resident", True, 0),
                             ("bf16 + block swap", False, blocks * 3 // 4), ("fp8 + block swap", True, blocks // 2)):
        # Built on the CPU, so block swap's store stays in (pinned) CPU memory and only the rest moves.
        model = build_transformer(MODELS["12B"], torch.device("cpu"), torch.bfloat16, args.tiny)
        if fp8:
            quantize_to_fp8(model, torch.bfloat16)
        if swap:
            enable_block_swap(model, swap, device)
        model.to(device)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        inputs = step_inputs(model.config, size, device, torch.bfloat16)
        with torch.inference_mode():
            seconds, peak = timed(lambda m=model, i=inputs: m(**i), device, args.runs)
        what = f"{label} ({swap} of {blocks} swapped)" if swap else label
        lines.append(f"| {what} | {gb(weight_bytes(model))} | {seconds:.3f} | {gb(peak)} |")
        print(lines[-1], flush=True)
        del model, inputs
        if device.type == "cuda":
            torch.cuda.empty_cache()


def vae_rows(args, device, lines):
    lines += ["", "VAE decode, 13 latent frames (49 video frames), bf16:", "",
              "| size | tiling | seconds | peak VRAM |", "|---|---|---|---|"]
    widths = (32, 64, 128, 128) if args.tiny else (128, 256, 512, 512)
    vae = MagvitVAE(block_out_channels=widths, norm_num_groups=16 if args.tiny else 32).to(device, torch.bfloat16)
    for height, width, frames in (TINY_SIZES if args.tiny else SIZES):
        z = torch.randn(1, 16, (frames - 1) // 4 + 1, height // 8, width // 8, device=device, dtype=torch.bfloat16)
        for tiled in (False, True):
            vae.enable_tiling(384 if not args.tiny else 64) if tiled else vae.disable_tiling()
            with torch.inference_mode():
                seconds, peak = timed(lambda: vae.decode(z), device, 1)
            lines.append(f"| {height}x{width}x{frames} | {'384 px' if tiled else 'off'} | {seconds:.2f} | {gb(peak)} |")
            print(lines[-1], flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--tiny", action="store_true", help="tiny configs and sizes (a smoke run of this script)")
    parser.add_argument("--out", type=Path, default=None, help="also write the table here (markdown)")
    parser.add_argument("--skip", nargs="*", default=[], choices=["transformer", "modes", "vae"])
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run on a GPU machine, or use --tiny --device cpu for a smoke run")

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    lines = [f"# EasyAnimate V5 full-size benchmark on {name} (torch {torch.__version__})", ""]
    print(lines[0], flush=True)
    started = time.perf_counter()
    if "transformer" not in args.skip:
        transformer_rows(args, device, lines)
    if "modes" not in args.skip:
        memory_mode_rows(args, device, lines)
    if "vae" not in args.skip:
        vae_rows(args, device, lines)
    lines += ["", f"Published (original code, A100): {PUBLISHED_A100} s/step for 12B at 384x672x49. "
              f"Floor: matmul FLOPs at {H100_BF16_TFLOPS} TFLOP/s.", f"Total {time.perf_counter() - started:.0f} s."]
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines[-2:]))


if __name__ == "__main__":
    main()
