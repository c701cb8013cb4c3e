"""Cost of a LoRA on the V5 transformer: the run-time update easyanimate_core.lora uses vs merging weights.

Run: `python benchmarks/lora_cost.py` (about 1-2 minutes on 2 cores).

Measured on the CPU in float32, on the model of benchmarks/transformer_step.py (8 heads x 64, 4 MMDiT
layers, random weights). One denoising step = one guided forward, batch 2, latents [2, 16, 13, 32, 32]
(3328 video tokens) + 77 + 256 text tokens. LoRAs of rank 64 and 128 on every Linear, kohya layout, bf16
file, alpha = rank / 2.

- run time (chosen): `set_loras` from the file (cold) and again with the file cached (a strength
  change); extra time per step with the LoRA set; extra memory = the factor buffers on the model's
  device, and separately the parsed file kept in CPU RAM.
- merge (alternative): exact restoring needs a pristine copy of every targeted weight; a change is
  W.copy_(W0 + s * up @ down) per layer (and W.copy_(W0) to remove). No cost per step.

Ratios at this size overstate the 12B ones, since a rank-r update costs r(in + out) / (in * out) of its
Linear and this model's hidden size is 512 against 3072. The script therefore also counts, for this model
and for the 12B config at 384x672x49 (a forward on the meta device, no weights), LoRA bytes / weight bytes
(factors in the activation dtype) and LoRA FLOPs / step FLOPs (Linear layers + attention).

Timing: median of --runs after one warm-up each, configurations alternating, default torch thread count,
torch.inference_mode. Times are wall-clock; the extra time per step is also given in process CPU seconds
(all threads), the steadier number on a shared machine.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from easyanimate_core import lora  # noqa: E402
from easyanimate_core.models.transformer import EasyAnimateTransformer3D, TransformerConfig  # noqa: E402
from easyanimate_core.safetensors_io import load_file  # noqa: E402
from transformer_step import CONFIG, random_state_dict  # noqa: E402

RANKS = (64, 128)


def linears(model: nn.Module) -> dict[str, nn.Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}


def write_kohya(path: Path, model: nn.Module, rank: int, seed: int) -> Path:
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, m in linears(model).items():
        stem = "lora_unet_" + name.replace(".", "_")
        state[f"{stem}.lora_down.weight"] = (torch.randn(rank, m.in_features, generator=g) / m.in_features**0.5
                                             ).to(torch.bfloat16)
        state[f"{stem}.lora_up.weight"] = (torch.randn(m.out_features, rank, generator=g) * 0.01).to(torch.bfloat16)
        state[f"{stem}.alpha"] = torch.tensor(rank / 2)
    save_file(state, str(path))
    return path


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def timed_cpu(fn) -> tuple[float, float]:
    """(wall, process CPU) seconds of one call."""
    w0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w0, time.process_time() - c0


def lora_buffer_bytes(model: nn.Module) -> int:
    return sum(b.nbytes for n, b in model.named_buffers() if n.rsplit(".", 1)[-1] in ("lora_down", "lora_up"))


class Merger:
    """The alternative: pristine copies of the targeted weights, merged deltas written into the weights."""

    def __init__(self, model: nn.Module, path: Path):
        self.targets = linears(model)
        self.pristine = {n: m.weight.detach().clone() for n, m in self.targets.items()}
        tensors = load_file(path)
        self.factors = {}
        for name in self.targets:
            stem = "lora_unet_" + name.replace(".", "_")
            down, up = tensors[f"{stem}.lora_down.weight"].float(), tensors[f"{stem}.lora_up.weight"].float()
            self.factors[name] = (down, up, float(tensors[f"{stem}.alpha"]) / down.shape[0])

    def merge(self, strength: float) -> None:
        for name, (down, up, scale) in self.factors.items():
            w = self.targets[name].weight
            w.copy_(torch.addmm(self.pristine[name], up, down, alpha=strength * scale))

    def restore(self) -> None:
        for name, m in self.targets.items():
            m.weight.copy_(self.pristine[name])

    @property
    def extra_bytes(self) -> int:
        return sum(t.nbytes for t in self.pristine.values())


def count(config: TransformerConfig, frames: int, height: int, width: int, rank: int) -> tuple[float, float]:
    """(LoRA / weight parameters, LoRA / step FLOPs) of a guided step, counted by a forward on the meta device."""
    with torch.device("meta"):
        model = EasyAnimateTransformer3D(config)
    flops = {"linear": 0, "lora": 0, "attention": 0}

    def on_linear(m, args, out):
        tokens = args[0].numel() // m.in_features
        flops["linear"] += 2 * tokens * m.in_features * m.out_features
        flops["lora"] += 2 * tokens * rank * (m.in_features + m.out_features)

    def on_block(m, args, out):
        batch, length = args[0].shape[0], args[0].shape[1] + args[1].shape[1]
        flops["attention"] += 4 * batch * length**2 * config.inner_dim  # QK^T and AV

    for m in model.modules():
        if isinstance(m, nn.Linear):
            m.register_forward_hook(on_linear)
    for block in model.transformer_blocks:
        block.register_forward_hook(on_block)
    meta = dict(device="meta")
    with torch.inference_mode():
        model(torch.empty(2, config.in_channels, frames, height, width, **meta), torch.full((2,), 999.0, **meta),
              torch.empty(2, 77, config.text_embed_dim, **meta), torch.empty(2, 256, config.text_embed_dim_t5, **meta))
    params = sum(p.numel() for p in model.parameters())
    lora_params = sum(rank * (m.in_features + m.out_features) for m in linears(model).values())
    return lora_params / params, flops["lora"] / (flops["linear"] + flops["attention"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()

    model = EasyAnimateTransformer3D(TransformerConfig(**CONFIG)).eval()
    model.load_state_dict(random_state_dict(model), strict=True)
    weight_bytes = sum(p.nbytes for p in model.parameters())
    gen = torch.Generator().manual_seed(1)
    inputs = (torch.randn(2, 16, 13, 32, 32, generator=gen), torch.tensor([999.0, 999.0]),
              torch.randn(2, 77, 1024, generator=gen), torch.randn(2, 256, 2048, generator=gen))
    rope = model.rope(13, 16, 16, torch.device("cpu"))

    def step():
        model(*inputs, image_rotary_emb=rope)

    print(f"model: {weight_bytes / 2**20:.0f} MiB of float32 weights, {len(linears(model))} Linear layers; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        paths = {r: write_kohya(Path(tmp) / f"r{r}.safetensors", model, r, seed=r) for r in RANKS}
        configs = [[]] + [[(paths[r], 1.0)] for r in RANKS]
        for cfg in configs:  # warm-up, and reads the files once
            lora.set_loras(model, cfg)
            step()
        samples = {i: [] for i in range(len(configs))}
        for _ in range(args.runs):
            for i, cfg in enumerate(configs):
                lora.set_loras(model, cfg)
                samples[i].append(timed_cpu(step))
        step_s, step_cpu = (statistics.median(s[k] for s in samples[0]) for k in (0, 1))
        print(f"one denoising step (guided forward, batch 2): {step_s:.3f} s wall, {step_cpu:.3f} s CPU")

        rows = []
        for i, r in enumerate(RANKS, start=1):
            lora.set_loras(model, [])
            lora.clear_cache()
            cold = timed(lambda: lora.set_loras(model, [(paths[r], 1.0)]))
            warm = statistics.median(timed(lambda: lora.set_loras(model, [(paths[r], s)])) for s in (0.5, 0.7, 0.9))
            per_step = [statistics.median(s[k] for s in samples[i]) / base - 1
                        for k, base in ((0, step_s), (1, step_cpu))]
            buffers = lora_buffer_bytes(model)
            cache = sum(t.nbytes for ts in lora._cache.values() for t in ts.values())
            lora.set_loras(model, [])

            merger = Merger(model, paths[r])
            merge = statistics.median(timed(lambda: merger.merge(s)) for s in (0.5, 0.7, 0.9))
            restore = timed(merger.restore)
            rows.append((r, cold, warm, per_step, buffers, cache, merge, restore, merger.extra_bytes))

    print("\ntime as a ratio of one step, memory as a ratio of the model's weight bytes:")
    print(f"{'rank':>5} | {'run time: set cold':>18} {'set cached':>10} {'per step wall/CPU':>17} {'buffers':>8} "
          f"{'CPU cache':>9} | {'merge: change':>13} {'remove':>7} {'per step':>9} {'pristine':>9}")
    for r, cold, warm, per_step, buffers, cache, merge, restore, pristine in rows:
        steps = f"{per_step[0]:+.1%} / {per_step[1]:+.1%}"
        print(f"{r:>5} | {cold / step_s:>18.3f} {warm / step_s:>10.3f} {steps:>17} "
              f"{buffers / weight_bytes:>8.1%} {cache / weight_bytes:>9.1%} | {merge / step_s:>13.3f} "
              f"{restore / step_s:>7.3f} {0:>+9.1%} {pristine / weight_bytes:>9.1%}")

    print("\ncounted (forward on the meta device), run-time update, guided step:")
    for label, config, shape in (("this model, 13x32x32 latents ", TransformerConfig(**CONFIG), (13, 32, 32)),
                                 ("12B at 384x672x49 (bf16)     ", TransformerConfig(), (13, 48, 84))):
        for r in RANKS:
            params, flops = count(config, *shape, r)
            print(f"  {label} rank {r:>3}: LoRA {params:.1%} of the weight bytes (float8 weights: {2 * params:.1%}), "
                  f"extra FLOPs {flops:.1%} of a step")


if __name__ == "__main__":
    main()
