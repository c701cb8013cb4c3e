"""fp8 weight storage of the transformer: bytes, accuracy of one forward, peak RSS while loading.

    python benchmarks/fp8_storage.py [--gb 1.0] [--no-rss]

1. Transformer weight bytes, bf16 vs fp8 storage (easyanimate_core.fp8), for the full-size 12B and
   7B configs built on the meta device (counted from shapes, nothing allocated) and for tiny models.
2. One forward on a small random model: max |diff| of fp8 storage vs bf16 weights vs float32 weights.
3. Peak RSS increase while loading a bf16 checkpoint of about --gb GB, in fresh processes, plain bf16
   vs fp8 (quantised tensor by tensor as read), as a ratio of the file size (as load_memory.py).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

import torch
from torch import nn

from easyanimate_core.fp8 import quantize_to_fp8, weight_bytes
from easyanimate_core.models.transformer import EasyAnimateTransformer3D

FULL = dict(in_channels=33, num_attention_heads=48, attention_head_dim=64, time_embed_dim=512, text_embed_dim=1024,
            text_embed_dim_t5=2048, add_noise_in_inpaint_model=True)
CONFIGS = {
    "12B (48 layers, all MMDiT)": dict(FULL, num_layers=48, mmdit_layers=48),
    "7B (36 layers, 18 MMDiT)": dict(FULL, num_layers=36, mmdit_layers=18),
}

CHILD = r"""
import json, sys, psutil, torch
from pathlib import Path
sys.path.insert(0, {repo!r})
from easyanimate_core.models.transformer import EasyAnimateTransformer3D
from easyanimate_core.loading import load_weights_into
from easyanimate_core.fp8 import load_fp8_weights_into, weight_bytes
config = json.loads(Path({config!r}).read_text())
path = Path({weights!r})
with torch.device("meta"):
    model = EasyAnimateTransformer3D.from_config_dict(config)
before = psutil.Process().memory_info().rss
if {mode!r} == "fp8":
    load_fp8_weights_into(model, (path,), dtype=torch.bfloat16)
else:
    load_weights_into(model, (path,), dtype=torch.bfloat16)
peak = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({{"before": before, "peak": peak, "model_bytes": weight_bytes(model)}}))
"""


def proportional_config() -> dict:
    """tests/test_fp8.py's small config whose block Linears hold ~98 % of the weights, like the 12B."""
    from tiny_model import transformer_config

    cfg = transformer_config("t2v", num_layers=4, mmdit_layers=4)
    cfg.update(num_attention_heads=8, attention_head_dim=32, time_embed_dim=48, text_embed_dim=64,
               text_embed_dim_t5=128)
    return cfg


def block_fraction(model: nn.Module) -> float:
    total = sum(p.numel() for p in model.parameters())
    blocks = sum(p.numel() for n, m in model.named_modules()
                 if isinstance(m, nn.Linear) and n.startswith("transformer_blocks.") for p in m.parameters())
    return blocks / total


def storage_row(name: str, model: nn.Module) -> None:
    """`model` is consumed: cast to bf16, counted, quantised, counted."""
    model = model.to(torch.bfloat16)
    bf16, fraction = weight_bytes(model), block_fraction(model)
    fp8 = weight_bytes(quantize_to_fp8(model, torch.bfloat16))
    print(f"{name:<34} {fraction:>10.2%} {bf16 / 1e9:>12.4f} {fp8 / 1e9:>12.4f} {fp8 / bf16:>8.4f}")


def storage_table() -> None:
    from tiny_model import transformer_config

    print("1. transformer weight bytes (parameters + buffers)")
    print(f"{'model':<34} {'block Lin.':>10} {'bf16 GB':>12} {'fp8 GB':>12} {'ratio':>8}")
    for name, cfg in CONFIGS.items():
        with torch.device("meta"):
            storage_row(name, EasyAnimateTransformer3D.from_config_dict(cfg))
    storage_row("tiny, real proportions (tests)", EasyAnimateTransformer3D.from_config_dict(proportional_config()))
    storage_row("tiny test model (dim 32)", EasyAnimateTransformer3D.from_config_dict(transformer_config("t2v")))


def forward_accuracy() -> None:
    torch.manual_seed(0)
    model = EasyAnimateTransformer3D.from_config_dict(proportional_config())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape) / p[0].numel() ** 0.5)
            elif name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape))
            else:
                p.copy_(0.02 * torch.randn(p.shape))
    model.eval()
    g = torch.Generator().manual_seed(1)
    args = (torch.randn(2, 16, 3, 16, 16, generator=g), torch.tensor([700.0, 300.0]),
            torch.randn(2, 5, 64, generator=g), torch.randn(2, 7, 128, generator=g))

    def run(m, dtype):
        with torch.inference_mode():
            return m(args[0].to(dtype), args[1], args[2].to(dtype), args[3].to(dtype)).float()

    ref = run(model, torch.float32)
    bf16 = run(copy.deepcopy(model).to(torch.bfloat16), torch.bfloat16)
    fp8_bf16 = run(quantize_to_fp8(copy.deepcopy(model), torch.bfloat16), torch.bfloat16)
    fp8_fp32 = run(quantize_to_fp8(copy.deepcopy(model), torch.float32), torch.float32)
    scale = ref.abs().max().item()
    print(f"\n2. one forward, tiny model with real proportions (dim 256, 4 MMDiT blocks), max |output| {scale:.3f}")
    for label, out, base in (("fp8 storage vs bf16 weights (bf16 compute)", fp8_bf16, bf16),
                             ("fp8 storage vs float32 weights (bf16 compute)", fp8_bf16, ref),
                             ("fp8 storage vs float32 weights (fp32 compute)", fp8_fp32, ref),
                             ("bf16 weights vs float32 weights", bf16, ref)):
        diff = (out - base).abs().max().item()
        rel = ((out - base).norm() / base.norm()).item()
        print(f"   {label:<48} max |diff| {diff:.3e} ({diff / scale:.2%}), rel L2 {rel:.2e}")


def write_checkpoint(folder: Path, target_gb: float) -> tuple[Path, Path]:
    from safetensors.torch import save_file

    from load_memory import mid_size_config

    layers = 1
    while True:
        with torch.device("meta"):
            probe = EasyAnimateTransformer3D.from_config_dict(mid_size_config(layers))
        if sum(p.numel() for p in probe.parameters()) * 2 >= target_gb * 1e9:
            break
        layers += 1
    generator = torch.Generator().manual_seed(0)
    state = {name: (torch.randn(p.shape, generator=generator) * 0.02).bfloat16()
             for name, p in probe.state_dict().items()}
    weights = folder / "diffusion_pytorch_model.safetensors"
    save_file(state, str(weights))
    del state
    (folder / "config.json").write_text(json.dumps(mid_size_config(layers)))
    return folder / "config.json", weights


def rss_table(gb: float) -> None:
    sys.path.insert(0, str(REPO / "benchmarks"))
    with tempfile.TemporaryDirectory() as tmp:
        config, weights = write_checkpoint(Path(tmp), gb)
        size = os.path.getsize(weights)
        print(f"\n3. peak RSS while loading a {size / 1e9:.2f} GB bf16 checkpoint (mid-size V5 config), "
              "fresh processes")
        print(f"{'loader':<8} {'model bytes':>12} {'peak RSS increase':>18} {'ratio to file size':>19}")
        for mode in ("bf16", "fp8"):
            code = CHILD.format(repo=str(REPO), config=str(config), weights=str(weights), mode=mode)
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
            result = json.loads(out.stdout.strip().splitlines()[-1])
            increase = result["peak"] - result["before"]
            print(f"{mode:<8} {result['model_bytes'] / 1e9:>9.2f} GB {increase / 1e9:>15.2f} GB "
                  f"{increase / size:>19.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gb", type=float, default=1.0, help="bf16 checkpoint size for the RSS measurement (GB)")
    parser.add_argument("--no-rss", action="store_true", help="skip the RSS measurement")
    args = parser.parse_args()
    storage_table()
    forward_accuracy()
    if not args.no_rss:
        rss_table(args.gb)


if __name__ == "__main__":
    main()
