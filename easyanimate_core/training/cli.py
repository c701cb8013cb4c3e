"""`python -m easyanimate_core train-lora --model DIR --data DIR --out FILE [...]`."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from ..errors import UnsupportedRequestError
from .adapter import TARGET_SETS


def add_parser(sub) -> argparse.ArgumentParser:
    """Register the train-lora subcommand on an argparse subparsers object."""
    p = sub.add_parser("train-lora", help="train a LoRA on a folder of captioned images/videos")
    p.add_argument("--model", required=True, help="model folder, e.g. models/EasyAnimate/EasyAnimateV5-12b-zh-InP")
    p.add_argument("--data", required=True, help="folder of images/videos with same-name .txt captions, or the "
                                                 "original's JSON list ({file_path, text, type})")
    p.add_argument("--out", required=True, help="the LoRA .safetensors to write (also <out>.state.pt for --resume)")
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--rank", type=int, default=32, help="LoRA rank (default 32; the original uses 128)")
    p.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default: the rank; the original uses 64)")
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (constant after --warmup-steps)")
    p.add_argument("--warmup-steps", type=int, default=0)
    p.add_argument("--resolution", type=int, default=512,
                   help="bucket base side for a --frames video; shorter clips and images get larger sides at the same "
                        "token budget, up to --image-resolution")
    p.add_argument("--image-resolution", type=int, default=None, help="largest bucket base side (default 2x "
                                                                        "--resolution, at most 1024)")
    p.add_argument("--frames", type=int, default=49, help="frames per video clip (4k+1)")
    p.add_argument("--repeat", type=int, default=1, help="times each file appears per epoch")
    p.add_argument("--targets", default="all", choices=TARGET_SETS,
                   help="all: every Linear of the transformer (as the original); attention: q/k/v/out only")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--save-every", type=int, default=0, metavar="N", help="also save every N steps (and the "
                                                                           "optimizer state, for --resume)")
    p.add_argument("--caption-dropout", type=float, default=0.1, help="probability of training on the empty caption")
    p.add_argument("--trigger-words", default="", help="stored in the file's metadata")
    p.add_argument("--captions-from-filenames", action="store_true",
                   help="use the file name as caption where no .txt exists (default: refuse such files)")
    p.add_argument("--cache", default=None, help="cache folder (default <data>/.easyanimate_cache)")
    p.add_argument("--rebuild-cache", action="store_true", help="re-encode everything (replaces the cache)")
    p.add_argument("--fp8", action="store_true", help="store the frozen transformer blocks in fp8")
    p.add_argument("--swap-blocks", type=int, default=0, metavar="N",
                   help="keep the last N transformer blocks in CPU memory, streamed in forward and backward "
                        "(turns on gradient checkpointing)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute each block in the backward")
    p.add_argument("--resume", action="store_true", help="continue from --out and its .state.pt")
    p.add_argument("--full", action="store_true",
                   help="full fine-tune instead of a LoRA (small models, e.g. test models): every transformer weight "
                        "trains and --out is a new model folder (the other components are copied)")
    p.add_argument("--log", default=None, help="CSV loss log (default <out>.csv)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=["fp32", "bf16"], help="frozen weights and activations "
                                                                           "(default bf16 on GPU, fp32 on CPU)")
    return p


def run(args) -> int:
    from .. import load_pipeline
    from .cache import DEFAULT_CACHE_DIR, PipelineEncoders, build_cache
    from .dataset import DatasetSettings, scan_folder
    from .loop import TrainConfig, train_full, train_lora

    from tqdm import tqdm

    dtype = args.dtype or ("bf16" if torch.device(args.device).type == "cuda" else "fp32")
    image_resolution = args.image_resolution or min(2 * args.resolution, 1024)
    settings = DatasetSettings(args.resolution, args.frames, max(image_resolution, args.resolution))
    config = TrainConfig(steps=args.steps, rank=args.rank, alpha=args.alpha if args.alpha is not None else args.rank,
                         lr=args.lr, seed=args.seed, targets=args.targets, warmup_steps=args.warmup_steps,
                         save_every=args.save_every, caption_dropout=args.caption_dropout,
                         gradient_checkpointing=args.gradient_checkpointing, trigger_words=args.trigger_words)
    config.validate()
    items = scan_folder(args.data, "filename" if args.captions_from_filenames else "refuse", args.repeat)
    data = Path(args.data)
    cache_dir = Path(args.cache) if args.cache else (data if data.is_dir() else data.parent) / DEFAULT_CACHE_DIR

    memory = ("fp8_" if args.fp8 else "") + ("block_swap" if args.swap_blocks else "offload")
    memory = "fp8" if memory == "fp8_offload" else memory
    t0 = time.perf_counter()
    print(f"loading {args.model} on {args.device} ({dtype}, {memory})…", flush=True)
    pipe = load_pipeline(args.model, device=args.device, dtype=dtype, memory=memory,
                         swap_blocks=args.swap_blocks or None)
    encoders = PipelineEncoders(pipe)
    with tqdm(total=len(items), desc="caching latents", unit="file") as bar:
        samples = build_cache(encoders, items, settings, cache_dir, rebuild=args.rebuild_cache,
                              progress=lambda i, n, name: bar.update(i - bar.n))
    empty = encoders.encode_text("")
    print(f"{len(samples)} samples ({sum(s.repeat for s in samples)} per epoch) cached in {cache_dir}; "
          f"{time.perf_counter() - t0:.1f}s", flush=True)

    out = Path(args.out)
    if args.full:
        if args.fp8 or args.swap_blocks or args.resume:
            raise UnsupportedRequestError("--full trains every weight: it cannot use --fp8, --swap-blocks or --resume")
        with tqdm(total=config.steps, desc="full fine-tune", unit="step") as bar:
            result = train_full(pipe, samples, empty, config, out, vae_scaling_factor=pipe.vae.scaling_factor,
                                callback=lambda step, total, loss: (bar.update(step - bar.n),
                                                                    bar.set_postfix(loss=f"{loss:.4f}")),
                                log_csv=args.log or out / "train_log.csv")
        print(f"wrote the model folder {out} after {result.steps_done} steps (last loss {result.losses[-1]:.4f})",
              flush=True)
        return 0
    with tqdm(total=config.steps, desc="training", unit="step") as bar:
        def progress(step, total, loss):
            bar.n = step
            bar.set_postfix(loss=f"{loss:.4f}")
            bar.refresh()

        result = train_lora(pipe, samples, empty, config, out, resume=args.resume, base_model=Path(args.model).name,
                            log_csv=args.log or out.with_suffix(".csv"), callback=progress,
                            vae_scaling_factor=pipe.vae.scaling_factor)
    print(f"wrote {result.path} after {result.steps_done} steps (last loss {result.losses[-1]:.4f}); "
          f"loss log {args.log or out.with_suffix('.csv')}", flush=True)
    return 0
