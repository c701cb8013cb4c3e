"""Headless entry point: `python -m easyanimate_core generate --model DIR --prompt "…" --out video.mp4`."""
from __future__ import annotations

import argparse
import sys
import time

import torch

from . import load_pipeline
from .buckets import BASE_RESOLUTIONS, bucket_size
from .errors import EasyAnimateError
from .loading import validate_model_dir
from .memory import MEMORY_MODES, requested_mode
from .media import read_frames, read_image, write_video
from .pipeline import DEFAULT_NEGATIVE_PROMPT
from .samplers import DEFAULT_SAMPLER, SAMPLER_NAMES


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m easyanimate_core", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    info = sub.add_parser("check", help="validate a model folder and print its kind")
    info.add_argument("--model", required=True, help="model folder in the original layout")

    gen = sub.add_parser("generate", help="generate a video file")
    gen.add_argument("--model", required=True, help="model folder, e.g. models/EasyAnimate/EasyAnimateV5-12b-zh-InP")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--negative-prompt", default=DEFAULT_NEGATIVE_PROMPT)
    gen.add_argument("--out", required=True, help="output .mp4 (or .png for a single frame)")
    gen.add_argument("--height", type=int, default=None, help="default 384, or the input's bucket")
    gen.add_argument("--width", type=int, default=None, help="default 672, or the input's bucket")
    gen.add_argument("--base-resolution", type=int, default=512, choices=BASE_RESOLUTIONS,
                     help="bucket base used to size image/video inputs when --height/--width are not given")
    gen.add_argument("--frames", type=int, default=49, help="rounded down to 4k+1 (49 → 13 latent frames)")
    gen.add_argument("--steps", type=int, default=50)
    gen.add_argument("--cfg", type=float, default=6.0, help="guidance scale; ≤ 1 disables guidance")
    gen.add_argument("--sampler", default=DEFAULT_SAMPLER, choices=SAMPLER_NAMES)
    gen.add_argument("--seed", type=int, default=43)
    gen.add_argument("--start-image", help="first frame (InP models)")
    gen.add_argument("--end-image", help="last frame (InP models)")
    gen.add_argument("--video", help="input video for video-to-video or region editing")
    gen.add_argument("--mask", help="mask image or video for region editing (white = regenerate; InP models)")
    gen.add_argument("--strength", type=float, default=None, help="video-to-video strength (default 0.7 with --video "
                                                                       "and no --mask, else 1.0)")
    gen.add_argument("--control-video", help="processed control video (pose, canny, depth…; Control models)")
    gen.add_argument("--fps", type=float, default=8.0)
    gen.add_argument("--vae-tile", type=int, default=0, metavar="PIXELS",
                     help="decode/encode in spatial tiles of this many pixels (e.g. 384) to bound VAE memory; 0 = off")
    gen.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    gen.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"],
                     help="default bf16 on GPU, fp32 on CPU")
    gen.add_argument("--memory", default="auto", choices=MEMORY_MODES,
                     help="gpu: everything resident; offload: each component on the GPU only while used; fp8: fp8 "
                          "transformer weights + offload; block_swap / fp8_block_swap: offload + the last N "
                          "transformer blocks streamed from CPU memory; auto (default): the first of these that "
                          "fits this video in the free GPU memory (on the CPU: everything resident)")
    gen.add_argument("--swap-blocks", type=int, default=None, metavar="N",
                     help="transformer blocks to swap with --memory block_swap/fp8_block_swap (default: the fewest "
                          "that fit); alone, it means --memory block_swap")
    gen.add_argument("--parallel", default=None, metavar="SPEC",
                     help='several GPUs/processes under torchrun, e.g. "ulysses=2,cfg=2" (ulysses × cfg processes: '
                          "Ulysses splits the video tokens, cfg=2 the guided halves); rank 0 writes the video")
    gen.add_argument("--backend", default=None, choices=["nccl", "gloo"],
                     help="torch.distributed backend with --parallel (default: nccl on CUDA, gloo on the CPU)")
    return parser


def _generate(args) -> int:
    dtype = args.dtype or ("bf16" if torch.device(args.device).type == "cuda" else "fp32")
    start = read_image(args.start_image) if args.start_image else None
    end = read_image(args.end_image) if args.end_image else None
    video = read_frames(args.video, args.frames) if args.video else None
    control = read_frames(args.control_video, args.frames) if args.control_video else None
    mask = read_frames(args.mask, args.frames).mean(-1) if args.mask else None
    reference = next((x for x in (start, end) if x is not None), None)
    if reference is None:
        reference = next((x[0] for x in (video, control) if x is not None), None)
    height, width = args.height, args.width
    if height is None or width is None:
        if reference is not None:
            height, width = bucket_size(reference.shape[0], reference.shape[1], args.base_resolution)
        else:
            height, width = height or 384, width or 672
    strength = args.strength if args.strength is not None else (0.7 if video is not None and mask is None else 1.0)

    device, say = args.device, print
    if args.parallel:
        from .parallel import init_distributed, parse_parallel

        parse_parallel(args.parallel)  # a bad spec fails here, before any process group
        device = init_distributed(args.device, args.backend)
        if torch.distributed.get_rank() != 0:
            def say(*_, **__):  # only rank 0 reports
                return None
    t0 = time.perf_counter()
    say(f"loading {args.model} on {device} ({dtype})" + (f", {args.parallel}" if args.parallel else "") + "…",
        flush=True)
    pipe = load_pipeline(args.model, device=device, dtype=dtype,
                         memory=requested_mode(args.memory, args.swap_blocks), swap_blocks=args.swap_blocks,
                         plan_for=(height, width, args.frames), parallel=args.parallel)
    say(pipe.memory_plan.describe(), flush=True)
    if args.vae_tile:
        pipe.set_vae_tiling(True, args.vae_tile)
    say(f"loaded a {pipe.kind} model in {time.perf_counter() - t0:.1f}s; generating {height}x{width}", flush=True)
    t1 = time.perf_counter()

    def progress(info):
        elapsed = time.perf_counter() - t1
        say(f"step {info.step}/{info.total} (t={info.timestep:.0f}) {elapsed:.1f}s", flush=True)

    result = pipe.generate(args.prompt, negative_prompt=args.negative_prompt, height=height, width=width,
                           num_frames=args.frames, num_inference_steps=args.steps, guidance_scale=args.cfg,
                           sampler=args.sampler, seed=args.seed, start_image=start, end_image=end, video=video,
                           mask=mask, strength=strength, control_video=control, callback=progress)
    if result.frames is None:  # a parallel rank other than 0: rank 0 writes the video
        return 0
    path = write_video(args.out, result.frames, fps=args.fps)
    frames = result.frames
    print(f"wrote {path}: {frames.shape[0]} frames {frames.shape[1]}x{frames.shape[2]} at {args.fps:g} fps "
          f"in {time.perf_counter() - t0:.1f}s", flush=True)
    return 0


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "check":
            files = validate_model_dir(args.model)
            print(f"{files.root}: EasyAnimate V5 {files.kind} model, all files present")
            return 0
        return _generate(args)
    except (EasyAnimateError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        if getattr(args, "parallel", None) and torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
