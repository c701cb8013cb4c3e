"""One transformer forward, ours vs diffusers' EasyAnimateTransformer3DModel, on the CPU in float32.

Run: `python benchmarks/transformer_step.py` (about 1-2 minutes on 2 cores).

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
V5 tables, the same tensors passed to ours (computing them is not part of the timed forward for either).

Timing: wall-clock seconds (and process CPU seconds, all threads) per forward, median of --runs after one
warm-up each, the two models alternating, default torch thread count, torch.inference_mode. On a shared
machine the CPU-seconds ratio is the steadier one.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from easyanimate_core.models.rope import build_3d_rope  # noqa: E402
from easyanimate_core.models.transformer import EasyAnimateTransformer3D, TransformerConfig  # noqa: E402

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


def time_interleaved(fns, runs: int) -> list[tuple[float, float]]:
    """Median (wall, cpu) seconds per call of each fn; runs alternate so background load hits both alike."""
    for fn in fns:
        fn()  # warm-up
    samples = [([], []) for _ in fns]
    for _ in range(runs):
        for fn, (wall, cpu) in zip(fns, samples):
            w0, c0 = time.perf_counter(), time.process_time()
            fn()
            wall.append(time.perf_counter() - w0)
            cpu.append(time.process_time() - c0)
    return [(statistics.median(wall), statistics.median(cpu)) for wall, cpu in samples]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--frames", type=int, default=13)
    parser.add_argument("--size", type=int, default=32, help="latent height = width")
    args = parser.parse_args()

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

    def run_ours():
        return ours(latents, timestep, bert, t5, image_rotary_emb=rope)

    def run_theirs():
        return theirs(
            latents, timestep, encoder_hidden_states=bert, encoder_hidden_states_t5=t5, return_dict=False
        )[0]

    with torch.inference_mode():
        out_ours, out_theirs = run_ours(), run_theirs()
        max_diff = (out_ours - out_theirs).abs().max().item()
        ref_scale = out_theirs.abs().max().item()
        t_ours, t_theirs = time_interleaved([run_ours, run_theirs], args.runs)

    tokens = frames * (size // 2) ** 2
    print(f"latents {list(latents.shape)}: {tokens} video + 333 text tokens, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"max |ours - diffusers| = {max_diff:.3e}  (max |output| {ref_scale:.3f})")
    print(f"{'model':<12}{'wall s/forward':>16}{'cpu s/forward':>16}")
    print(f"{'ours':<12}{t_ours[0]:>16.3f}{t_ours[1]:>16.3f}")
    print(f"{'diffusers':<12}{t_theirs[0]:>16.3f}{t_theirs[1]:>16.3f}")
    print(f"ratio ours/diffusers: wall {t_ours[0] / t_theirs[0]:.3f}, cpu {t_ours[1] / t_theirs[1]:.3f}")


if __name__ == "__main__":
    main()
