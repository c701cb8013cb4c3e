"""One transformer forward, ours vs diffusers' EasyAnimateTransformer3DModel, on the CPU in float32.

Run: `python benchmarks/transformer_step.py [--runs N] [--threads T] [--compile]` (1-2 minutes on 2 cores;
--compile adds our compile_transformer_blocks copy as a third model, about 15-30 s more to compile).

Model: 8 heads x 64 (hidden 512), 4 layers, all MMDiT, in/out 16 channels, patch 2, temb 512, text dims
1024 (BERT) / 2048 (T5). Input: a CFG batch of 2, latents [2, 16, 13, 32, 32] (13*16*16 = 3328 video
tokens) plus 77 + 256 text tokens. Random weights (N(0, 1/fan_in) matrices, norm affine 1 + N(0, 0.1^2),
biases N(0, 0.02^2), as the goldens' tiny models) are loaded into both models.

Weight mapping ours -> diffusers 0.42 (V5.1 code): identical names except the text stream of MMDiT blocks,
which diffusers keeps inside `attn1`:
    attn2.to_q / to_k / to_v     -> attn1.add_q_proj / add_k_proj / add_v_proj
    attn2.norm_q / norm_k        -> attn1.norm_added_q / norm_added_k
    attn2.to_out.0               -> attn1.to_add_out
Time embedding, text_proj / text_proj_t5 ([BERT ; T5] concatenation), norms, ff/txt_ff and proj_out have the
same names and layout, so the V5 text inputs go in unchanged (with add_norm_text_encoder False, V5.1 code
keeps V5's text path).

One adaptation: diffusers computes its RoPE itself and its `get_3d_rotary_pos_embed` places fractional
positions with linspace(start, stop*(n-1)/n, n), which differs from V5's linspace(start, stop, n,
endpoint=False) when the crop does not start at 0. This square latent has crop ((0, 8), (30, 38)), so its
width positions differ. We therefore replace diffusers' `rope_embedding` submodule by one that returns our
V5 tables, the same tensors passed to ours (computing them is not part of the timed forward for either;
ours derives its complex form of the passed (cos, sin) inside the timed call, a 213K-element op).

Every model's output is first compared with diffusers' (max abs diff must be <= 1e-4, else nothing is
timed). Timing: wall-clock seconds and process CPU seconds (all threads) per forward, median of --runs
after one warm-up each, the models alternating within each round, the same torch thread count for all,
torch.inference_mode. On a shared machine the CPU-seconds ratio is the steadier one; the per-round CPU
ratios show the spread.

Measured on the 2-core shared development VM (Xeon, AVX-512, torch 2.14.1, 3 other jobs running),
max |ours - diffusers| = 2.3e-6:
    2 threads (default), 7 rounds: ours/diffusers wall 0.785, CPU 0.783 (rounds 0.74-0.83);
                                   compiled/diffusers wall 0.827, CPU 0.826
    1 thread, 5 rounds:            ours/diffusers 0.857 (rounds 0.84-0.88); compiled/diffusers 0.892
Where the time goes (torch.profiler, 1 thread, self CPU of one forward): ours 3.5 s = attention kernel
(_scaled_dot_product_flash_attention_for_cpu) 1.89 s (54 %) + matmuls 1.36 s (39 %: addmm 0.71, oneDNN
linear+GELU 0.53, mm 0.11) + everything else 0.26 s; diffusers 4.4 s = attention 1.88 s (43 %) +
matmuls 1.25 s (+0.16 s bias copies) + elementwise 1.2 s (copy 0.32, add 0.25, gelu 0.21, mul 0.17,
cat 0.14, layer_norm 0.09 ...). Attention and matmuls run near this CPU's fp32 peak (about 150 GFLOP/s
per core for the matmuls, 115 for the attention kernel, which also does the softmax) and are the same
kernels for both, so they are a floor of about 0.75-0.77 x diffusers at 1 thread; ours removes about
80 % of the rest.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from easyanimate_core.models.rope import build_3d_rope  # noqa: E402
from easyanimate_core.models.transformer import (  # noqa: E402
    EasyAnimateTransformer3D,
    TransformerConfig,
    compile_transformer_blocks,
)

MAX_ABS_DIFF = 1e-4  # outputs must agree this well before anything is timed

CONFIG = dict(
    in_channels=16,
    out_channels=16,
    patch_size=2,
    num_attention_heads=8,
    attention_head_dim=64,
    num_layers=4,
    mmdit_layers=4,
    time_embed_dim=512,
    text_embed_dim=1024,
    text_embed_dim_t5=2048,
)

TEXT_STREAM_RENAMES = {
    ".attn2.to_q.": ".attn1.add_q_proj.",
    ".attn2.to_k.": ".attn1.add_k_proj.",
    ".attn2.to_v.": ".attn1.add_v_proj.",
    ".attn2.norm_q.": ".attn1.norm_added_q.",
    ".attn2.norm_k.": ".attn1.norm_added_k.",
    ".attn2.to_out.0.": ".attn1.to_add_out.",
}


def to_diffusers_key(name: str) -> str:
    for ours, theirs in TEXT_STREAM_RENAMES.items():
        name = name.replace(ours, theirs)
    return name


def random_state_dict(model: nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, p in model.state_dict().items():
        if p.ndim >= 2:
            fan_in = p[0].numel()
            state[name] = torch.randn(p.shape, generator=gen) / fan_in**0.5
        elif name.endswith("weight"):
            state[name] = 1 + 0.1 * torch.randn(p.shape, generator=gen)
        else:
            state[name] = 0.02 * torch.randn(p.shape, generator=gen)
    return state


class FixedRope(nn.Module):
    """Stands in for diffusers' rope_embedding: returns the given (cos, sin)."""

    def __init__(self, tables):
        super().__init__()
        self.tables = tables

    def forward(self, hidden_states):
        return self.tables


def time_interleaved(fns, runs: int) -> list[tuple[list[float], list[float]]]:
    """Per-call (wall, cpu) seconds of each fn over `runs` rounds; within a round the fns run back to back,
    so a round's ratios compare calls made under about the same background load."""
    for fn in fns:
        fn()  # warm-up
    samples = [([], []) for _ in fns]
    for _ in range(runs):
        for fn, (wall, cpu) in zip(fns, samples):
            w0, c0 = time.perf_counter(), time.process_time()
            fn()
            wall.append(time.perf_counter() - w0)
            cpu.append(time.process_time() - c0)
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--frames", type=int, default=13)
    parser.add_argument("--size", type=int, default=32, help="latent height = width")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads, the same for every model (default: torch's default)")
    parser.add_argument("--compile", action="store_true",
                        help="also time ours with compile_transformer_blocks (compiling takes a minute or two)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from diffusers.models import EasyAnimateTransformer3DModel

    ours = EasyAnimateTransformer3D(TransformerConfig(**CONFIG)).eval()
    state = random_state_dict(ours)
    ours.load_state_dict(state, strict=True)

    theirs = EasyAnimateTransformer3DModel(**CONFIG).eval()
    theirs.load_state_dict({to_diffusers_key(k): v for k, v in state.items()}, strict=True)

    gen = torch.Generator().manual_seed(1)
    batch, frames, size = 2, args.frames, args.size
    latents = torch.randn(batch, 16, frames, size, size, generator=gen)
    timestep = torch.tensor([999.0, 999.0])
    bert = torch.randn(batch, 77, CONFIG["text_embed_dim"], generator=gen)
    t5 = torch.randn(batch, 256, CONFIG["text_embed_dim_t5"], generator=gen)
    rope = build_3d_rope(frames, size // 2, size // 2, CONFIG["attention_head_dim"])
    theirs.rope_embedding = FixedRope(rope)

    models = {
        "ours": lambda: ours(latents, timestep, bert, t5, image_rotary_emb=rope),
        "diffusers": lambda: theirs(
            latents, timestep, encoder_hidden_states=bert, encoder_hidden_states_t5=t5, return_dict=False
        )[0],
    }
    if args.compile:
        compiled = copy.deepcopy(ours)
        compile_transformer_blocks(compiled)
        models["ours compiled"] = lambda: compiled(latents, timestep, bert, t5, image_rotary_emb=rope)

    with torch.inference_mode():
        reference = models["diffusers"]()
        ref_scale = reference.abs().max().item()
        diffs = {}
        for name, fn in models.items():
            start = time.perf_counter()
            diffs[name] = (fn() - reference).abs().max().item()
            if name == "ours compiled":
                print(f"first compiled call (compiles): {time.perf_counter() - start:.1f} s")
        tokens = frames * (size // 2) ** 2
        print(f"latents {list(latents.shape)}: {tokens} video + 333 text tokens, torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads")
        for name, diff in diffs.items():
            if name != "diffusers":
                print(f"max |{name} - diffusers| = {diff:.3e}  (max |output| {ref_scale:.3f})")
        if max(diffs.values()) > MAX_ABS_DIFF:
            sys.exit(f"outputs differ by more than {MAX_ABS_DIFF}: not timing")
        samples = dict(zip(models, time_interleaved(list(models.values()), args.runs)))

    print(f"{'model':<16}{'wall s/forward':>16}{'cpu s/forward':>16}   (medians of {args.runs} runs)")
    for name, (wall, cpu) in samples.items():
        print(f"{name:<16}{statistics.median(wall):>16.3f}{statistics.median(cpu):>16.3f}")
    base_wall, base_cpu = samples["diffusers"]
    for name, (wall, cpu) in samples.items():
        if name == "diffusers":
            continue
        per_round = [c / b for c, b in zip(cpu, base_cpu)]
        print(f"ratio {name}/diffusers: wall {statistics.median(wall) / statistics.median(base_wall):.3f}, "
              f"cpu {statistics.median(cpu) / statistics.median(base_cpu):.3f} "
              f"(cpu per round: {', '.join(f'{r:.2f}' for r in per_round)})")


if __name__ == "__main__":
    main()
