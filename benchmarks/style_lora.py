"""Does a trained LoRA move samples toward a dataset's style? Colour statistics before / after, same seeds.

Run: `python benchmarks/style_lora.py [--model DIR] [--steps 300]` (default model: a tiny random T2V model
built on the spot). Not tests/assets/trained_tiny/: its VAE, trained only on shapes over a dark background,
reproduces this orange-cast dataset as dark images, so no LoRA on the transformer can reach the style there
(measured: 14 % reduction).

1. Writes --images synthetic images sharing a strong style: an orange colour cast over random texture,
   each captioned with its content only ("a picture number i"), so the LoRA must learn the style itself.
2. Trains a LoRA through the same path as the CLI (dataset folder -> cache -> train_lora).
3. Samples --samples videos (1 frame, the dataset's bucket) at fixed seeds from the base model and from the
   model with the LoRA, and compares per-channel colour statistics (mean and std of R, G, B over all pixels):
   distance = L2 norm of the 6-vector difference to the dataset's statistics. The dataset reference is the
   dataset's images as this model's VAE reproduces them (encode -> decode), which is all a LoRA on the
   transformer can reach; the raw images' statistics are printed too.
Prints the distances and the reduction ratio (1 - lora / base); the issue's bar is >= 50 %.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def colour_stats(frames: torch.Tensor) -> torch.Tensor:
    """[N, H, W, 3] 0..1 -> [mean R, G, B, std R, G, B]."""
    flat = frames.reshape(-1, 3).float()
    return torch.cat([flat.mean(0), flat.std(0)])


def run(model_dir, steps: int, images: int, samples: int, rank: int, lr: float, sample_steps: int, work: Path,
        quiet: bool = False) -> dict:
    from easyanimate_core import load_pipeline
    from easyanimate_core.training.cache import PipelineEncoders, build_cache
    from easyanimate_core.training.dataset import DatasetSettings, scan_folder
    from easyanimate_core.training.loop import TrainConfig, train_lora
    from easyanimate_core.vae_io import decode_latents
    from test_training import write_style_images

    say = (lambda *a: None) if quiet else print
    data = write_style_images(work / "style", n=images, size=(64, 112))
    pipe = load_pipeline(model_dir)
    settings = DatasetSettings(resolution=96, max_frames=1, image_resolution=96)  # 64x112 images stay 64x112
    encoders = PipelineEncoders(pipe)
    cached = build_cache(encoders, scan_folder(data), settings, data / ".cache")
    from easyanimate_core.media import read_image

    raw = torch.stack([read_image(p) for p in sorted(data.glob("*.png"))])
    rendered = torch.cat([decode_latents(pipe.vae, s.mean * pipe.vae.scaling_factor) for s in cached])
    target = colour_stats(rendered)

    def sample_stats():
        frames = [pipe.generate(f"a picture number {i}", height=64, width=112, num_frames=1,
                                num_inference_steps=sample_steps, seed=100 + i).frames for i in range(samples)]
        return colour_stats(torch.cat(frames))

    base = sample_stats()
    started = time.perf_counter()
    config = TrainConfig(steps=steps, rank=rank, alpha=float(rank), lr=lr, seed=0, caption_dropout=0.1)
    result = train_lora(pipe, cached, encoders.encode_text(""), config, work / "style.safetensors")
    seconds = time.perf_counter() - started
    pipe.set_loras([(result.path, 1.0)])
    try:
        trained = sample_stats()
    finally:
        pipe.set_loras([])
    d_base, d_lora = float((base - target).norm()), float((trained - target).norm())
    out = {"base": d_base, "lora": d_lora, "reduction": 1 - d_lora / d_base, "train_seconds": seconds,
           "first_loss": sum(result.losses[:10]) / len(result.losses[:10]),
           "last_loss": sum(result.losses[-10:]) / len(result.losses[-10:])}
    fmt = lambda t: "[" + ", ".join(f"{v:.3f}" for v in t.tolist()) + "]"  # noqa: E731
    say(f"dataset images (raw)       mean/std RGB {fmt(colour_stats(raw))}")
    say(f"dataset through the VAE    mean/std RGB {fmt(target)}  <- reference")
    say(f"base model samples         mean/std RGB {fmt(base)}  distance {d_base:.4f}")
    say(f"with the LoRA              mean/std RGB {fmt(trained)}  distance {d_lora:.4f}")
    say(f"distance reduced by {100 * out['reduction']:.1f} % ({steps} steps, rank {rank}, lr {lr:g}, "
        f"{seconds:.1f} s training; loss {out['first_loss']:.4f} -> {out['last_loss']:.4f} (means of 10 steps))")
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model folder (default: a tiny random T2V model)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--images", type=int, default=10)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--sample-steps", type=int, default=10)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = args.model
        if model is None:
            from tiny_model import build_tiny_model

            model = build_tiny_model(work / "tiny", "t2v")
        run(model, args.steps, args.images, args.samples, args.rank, args.lr, args.sample_steps, work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
