"""Peak resident memory while loading a >= 1 GB transformer checkpoint, as a ratio of the file size.

    python benchmarks/load_memory.py [--gb 1.1]

Writes a random fp32 checkpoint of a mid-size V5 transformer config, then loads it in fresh
processes two ways and prints the peak RSS increase over the process's resident size just before
loading, divided by the file size:
  ours       meta-device model + streamed safetensors reading (easyanimate_core.loading)
  reference  the common way: safetensors.torch.load_file + load_state_dict into a materialised model
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CHILD = r"""
import json, sys, psutil, torch
from pathlib import Path
sys.path.insert(0, {repo!r})
from easyanimate_core.models.transformer import EasyAnimateTransformer3D
from easyanimate_core.loading import load_weights_into
config = json.loads(Path({config!r}).read_text())
path = Path({weights!r})
before = psutil.Process().memory_info().rss
if {mode!r} == "ours":
    with torch.device("meta"):
        model = EasyAnimateTransformer3D.from_config_dict(config)
    load_weights_into(model, (path,), dtype=torch.float32)
else:
    from safetensors.torch import load_file
    model = EasyAnimateTransformer3D.from_config_dict(config)
    model.load_state_dict(load_file(str(path)))
# VmHWM is this process image's own peak; ru_maxrss would inherit the parent's size across fork+exec.
peak = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({{"before": before, "peak": peak}}))
"""


def mid_size_config(layers: int) -> dict:
    return {"in_channels": 33, "out_channels": 16, "patch_size": 2, "num_attention_heads": 16,
            "attention_head_dim": 64, "num_layers": layers, "mmdit_layers": layers, "time_embed_dim": 512,
            "text_embed_dim": 1024, "text_embed_dim_t5": 2048, "norm_eps": 1e-5, "norm_elementwise_affine": True,
            "flip_sin_to_cos": True, "freq_shift": 0, "activation_fn": "gelu-approximate",
            "time_position_encoding_type": "3d_rope", "add_noise_in_inpaint_model": True}


def write_checkpoint(folder: Path, target_gb: float) -> tuple[Path, Path]:
    import torch
    from safetensors.torch import save_file

    from easyanimate_core.models.transformer import EasyAnimateTransformer3D

    layers = 1
    while True:
        with torch.device("meta"):
            probe = EasyAnimateTransformer3D.from_config_dict(mid_size_config(layers))
        if sum(p.numel() for p in probe.parameters()) * 4 >= target_gb * 1e9:
            break
        layers += 1
    config = mid_size_config(layers)
    generator = torch.Generator().manual_seed(0)
    state = {name: torch.randn(p.shape, generator=generator) * 0.02 for name, p in probe.state_dict().items()}
    weights = folder / "diffusion_pytorch_model.safetensors"
    save_file(state, str(weights))
    del state
    (folder / "config.json").write_text(json.dumps(config))
    return folder / "config.json", weights


def measure(mode: str, config: Path, weights: Path) -> dict:
    code = CHILD.format(repo=str(REPO), config=str(config), weights=str(weights), mode=mode)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--gb", type=float, default=1.1, help="checkpoint size to write (GB)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        config, weights = write_checkpoint(Path(tmp), args.gb)
        size = os.path.getsize(weights)
        print(f"checkpoint: {size / 1e9:.2f} GB fp32 ({weights.name})")
        print(f"{'loader':<10} {'peak RSS increase':>18} {'ratio to file size':>20}")
        for mode in ("ours", "reference"):
            result = measure(mode, config, weights)
            increase = result["peak"] - result["before"]
            print(f"{mode:<10} {increase / 1e9:>15.2f} GB {increase / size:>20.2f}")


if __name__ == "__main__":
    main()
