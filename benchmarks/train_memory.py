"""CPU peak memory of one LoRA training step with each memory option, against the trainable state's bytes.

Run: `python benchmarks/train_memory.py` (a few minutes on 2 cores).

Each configuration runs in a fresh child process: a random mid-size V5 transformer (8 heads x 64 = hidden
512, 6 MMDiT blocks, about 43 M weights; float32 compute on the CPU), a rank-32 LoRA on every Linear,
latents [1, 16, 3, 32, 32] (768 video + 333 text tokens). The peak resident memory of the first
training step (VmHWM reset through /proc/self/clear_refs just before it, so building the model does not
count) is reported minus the resident memory before the step, i.e. what the step adds (activations,
gradients, AdamW state, temporaries), and in total.
Reference measured in the same run: the bytes of the trainable state (LoRA parameters + gradients +
AdamW's two moments, all float32 = 16 bytes per parameter).

Options: gradient checkpointing (per block, through blocks_runner); fp8 storage of the frozen block
weights (fp8.py; the resident weights shrink, but each Linear's dequantised weight is saved for the
backward unless checkpointing recomputes it); block swap of the last 3 blocks (block_swap.py; on the
CPU the swapped weights stay in CPU memory, so it cannot lower CPU RSS: it is listed to show it adds
nothing; its saving is GPU memory, estimated by easyanimate_core.training.planner). Also prints the
planner's 12B/7B estimates.
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
sys.path.insert(0, sys.argv[1])
from easyanimate_core.models.transformer import EasyAnimateTransformer3D, TransformerConfig
from easyanimate_core.training import LoraTrainer
opts = json.loads(sys.argv[2])
torch.manual_seed(0)
cfg = TransformerConfig(num_attention_heads=8, attention_head_dim=64, num_layers=6, mmdit_layers=6,
                        time_embed_dim=128, text_embed_dim=64, text_embed_dim_t5=96)
model = EasyAnimateTransformer3D(cfg)
with torch.no_grad():
    for p in model.parameters():
        p.normal_(0, 0.02 if p.dim() > 1 else 0.01)
        p.requires_grad_(False)
weights = sum(p.numel() for p in model.parameters())
if opts["fp8"]:
    from easyanimate_core.fp8 import quantize_to_fp8
    quantize_to_fp8(model, torch.float32)
if opts["swap"]:
    from easyanimate_core.block_swap import enable_block_swap
    enable_block_swap(model, opts["swap"], "cpu")
class Pipe: pass
pipe = Pipe(); pipe.transformer = model
pipe.scheduler_config = {"beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
                         "num_train_timesteps": 1000, "prediction_type": "v_prediction", "rescale_betas_zero_snr": True}
trainer = LoraTrainer(pipe, rank=32, alpha=32.0, lr=1e-4, seed=0, gradient_checkpointing=opts["ckpt"])
g = torch.Generator().manual_seed(0)
batch = (torch.randn(1, 16, 3, 32, 32, generator=g), torch.randn(1, 77, 64, generator=g),
         torch.randn(1, 256, 96, generator=g), torch.tensor([500]), torch.randn(1, 16, 3, 32, 32, generator=g))
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
import gc, time; gc.collect()
before = status("VmRSS:")  # the model, the LoRA and the inputs; nothing of a step yet
open("/proc/self/clear_refs", "w").write("5")
t = time.perf_counter()
trainer.step(*batch)
seconds = time.perf_counter() - t
trainable = sum(p.numel() for p in trainer.params)
print(json.dumps({"before": before, "peak": status("VmHWM:"), "trainable_params": trainable,
                  "weights": weights, "seconds": seconds}))
"""

CONFIGS = [
    ("plain", dict(ckpt=False, fp8=False, swap=0)),
    ("checkpointing", dict(ckpt=True, fp8=False, swap=0)),
    ("fp8", dict(ckpt=False, fp8=True, swap=0)),
    ("fp8 + checkpointing", dict(ckpt=True, fp8=True, swap=0)),
    ("block swap 3/6 (+ checkpointing)", dict(ckpt=True, fp8=False, swap=3)),
    ("fp8 + block swap 3/6 (+ checkpointing)", dict(ckpt=True, fp8=True, swap=3)),
]


def measure(opts: dict) -> dict:
    done = subprocess.run([sys.executable, "-c", CHILD, str(REPO), json.dumps(opts)], capture_output=True,
                          text=True, timeout=600)
    if done.returncode:
        raise RuntimeError(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args(argv)
    MB = 1e6
    rows = []
    for name, opts in CONFIGS:
        r = measure(opts)
        rows.append((name, r))
    state = rows[0][1]["trainable_params"] * 16
    print(f"mid-size model: {rows[0][1]['weights'] / 1e6:.1f} M frozen weights, {rows[0][1]['trainable_params'] / 1e6:.2f} "
          f"M LoRA params (rank 32, all Linears); trainable state (param + grad + 2 AdamW moments, fp32) "
          f"= {state / MB:.1f} MB")
    print("| option | RSS before step (MB) | step adds (MB) | step adds / trainable state | peak RSS (MB) | s/step |")
    print("|---|---|---|---|---|---|")
    for name, r in rows:
        added = r["peak"] - r["before"]
        print(f"| {name} | {r['before'] / MB:.0f} | {added / MB:.0f} | {added / state:.2f}x | {r['peak'] / MB:.0f} | "
              f"{r['seconds']:.2f} |")

    from easyanimate_core.memory import GB
    from easyanimate_core.training.planner import TRANSFORMER_7B, TRANSFORMER_12B, plan_training

    for label, cfg, gpu in (("12B", TRANSFORMER_12B, 24), ("7B", TRANSFORMER_7B, 16)):
        print(f"\nplanner, {label} rank 32 at 512x512x49 on {gpu} GB:")
        print(plan_training(cfg, gpu * GB, height=512, width=512, frames=49, rank=32).describe())
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main())
