"""Headless entry point: `python -m easyanimate_core generate --model DIR --prompt "…" --out video.mp4`."""
from __future__ import annotations

import argparse
import sys
import time

import torch

from . import load_pipeline
from .buckets import BASE_RESOLUTIONS, bucket_size
from .download import DownloadProgress, ensure_model
from .cache import POLICIES, CacheSettings
from .errors import EasyAnimateError
from .loading import validate_model_dir
from .memory import MEMORY_MODES, requested_mode
from .media import read_frames, read_image, write_video
from .pipeline import DEFAULT_NEGATIVE_PROMPT
from .samplers import DEFAULT_SAMPLER, SAMPLER_NAMES
from .text_loading import load_tokenizers


DEFAULT_MODELS_DIR = "models/EasyAnimate"
MODEL_HELP = ("a model folder (models/EasyAnimate/EasyAnimateV5-12b-zh-InP), or an official model name "
              "(EasyAnimateV5-7b-zh-InP or alibaba-pai/EasyAnimateV5-7b-zh-InP): official models that are not "
              "there yet are downloaded from the Hugging Face Hub first (resumable; HF_ENDPOINT selects a mirror)")
MODELS_DIR_HELP = "where official model names are looked for and downloaded to (default models/EasyAnimate)"
CPU_HEAVY_BYTES = 20e9  # transformer weights above this (bf16 on disk) are the 12B model


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m easyanimate_core", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    info = sub.add_parser("check", help="validate a model folder and print its kind")
    info.add_argument("--model", required=True, help=MODEL_HELP)
    info.add_argument("--models-dir", default=DEFAULT_MODELS_DIR, help=MODELS_DIR_HELP)

    gen = sub.add_parser("generate", help="generate a video file")
    gen.add_argument("--model", required=True, help=MODEL_HELP)
    gen.add_argument("--models-dir", default=DEFAULT_MODELS_DIR, help=MODELS_DIR_HELP)
    gen.add_argument("--prompt", required=True, action="append",
                     help="the prompt; with --long, give it several times for one prompt per chunk (or window), "
                          "the last repeating")
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
    gen.add_argument("--long", choices=["continue", "windows"], default=None,
                     help="a video longer than one clip (--frames): continue = the original's chunk-by-chunk "
                          "continuation (InP models); windows = sliding context windows (any model, e.g. Control)")
    gen.add_argument("--chunk-frames", type=int, default=49, help="with --long: frames per chunk/window (4k+1)")
    gen.add_argument("--overlap", type=int, default=4,
                     help="with --long: frames handed over between chunks / shared by windows")
    gen.add_argument("--fuse", choices=["linear", "pyramid"], default="linear",
                     help="with --long windows: how overlapping window predictions are mixed")
    gen.add_argument("--fps", type=float, default=8.0)
    gen.add_argument("--vae-tile", type=int, default=0, metavar="PIXELS",
                     help="decode/encode in spatial tiles of this many pixels (e.g. 384) to bound VAE memory; 0 = off")
    gen.add_argument("--device", default=None, help="default: the first CUDA GPU when there is one, else the CPU")
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
    gen.add_argument("--cache", default=None, metavar="POLICY:THRESHOLD[:START:END]",
                     help=f"step cache: skip transformer passes that would change little ({'/'.join(POLICIES)}), "
                          "e.g. teacache:0.1 or auto:0.2 (START/END: the fraction of steps where skipping may "
                          "happen, default 0.1:0.9); prints how many passes were skipped")

    cal = sub.add_parser("calibrate-cache", help="measure a model's TeaCache coefficients and write "
                                                 "<model>/step_cache.json, which --cache teacache then uses")
    cal.add_argument("--model", required=True, help="model folder in the original layout")
    cal.add_argument("--prompts", nargs="+", default=None, help="prompts to calibrate on (default: 3 built-in ones)")
    cal.add_argument("--height", type=int, default=384)
    cal.add_argument("--width", type=int, default=672)
    cal.add_argument("--frames", type=int, default=49)
    cal.add_argument("--steps", type=int, default=50)
    cal.add_argument("--cfg", type=float, default=6.0)
    cal.add_argument("--sampler", default=DEFAULT_SAMPLER, choices=SAMPLER_NAMES)
    cal.add_argument("--seed", type=int, default=43)
    cal.add_argument("--degree", type=int, default=4, help="polynomial degree (default 4)")
    cal.add_argument("--out", default=None, help="where to write the JSON (default: <model>/step_cache.json)")
    cal.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    cal.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"], help="default bf16 on GPU, fp32 on CPU")
    cal.add_argument("--memory", default="auto", choices=MEMORY_MODES, help="memory mode, as for generate")

    from .training.cli import add_parser as add_train_lora

    add_train_lora(sub)
    gen.add_argument("--parallel", default=None, metavar="SPEC",
                     help='several GPUs/processes under torchrun, e.g. "ulysses=2,cfg=2" (ulysses × cfg processes: '
                          "Ulysses splits the video tokens, cfg=2 the guided halves); rank 0 writes the video")
    gen.add_argument("--backend", default=None, choices=["nccl", "gloo"],
                     help="torch.distributed backend with --parallel (default: nccl on CUDA, gloo on the CPU)")
    return parser


def _calibrate(args) -> int:
    from .cache_calibration import DEFAULT_PROMPTS, calibrate, write_coefficients

    dtype = args.dtype or ("bf16" if torch.device(args.device).type == "cuda" else "fp32")
    pipe = load_pipeline(args.model, device=args.device, dtype=dtype, memory=requested_mode(args.memory, None),
                         plan_for=(args.height, args.width, args.frames))
    data = calibrate(pipe, args.prompts or DEFAULT_PROMPTS, height=args.height, width=args.width,
                     num_frames=args.frames, num_inference_steps=args.steps, guidance_scale=args.cfg,
                     sampler=args.sampler, seed=args.seed, degree=args.degree,
                     log=lambda msg: print(msg, flush=True))
    path = write_coefficients(pipe.model_dir, data, args.out)
    fit = data["calibration"]
    print(f"wrote {path}: TeaCache coefficients for a {data['model']['kind']} model of size {data['model']['size']} "
          f"from {fit['points']} step pairs (mean |fit error| {fit['mean_abs_fit_error']:.4f}, mean output change "
          f"{fit['mean_output_change']:.4f})", flush=True)
    return 0



def _model_folder(args):
    """The --model folder, downloaded first when it names an official model that is not there yet."""
    bar = None

    def progress(info: DownloadProgress) -> None:
        nonlocal bar
        if bar is None:
            from tqdm import tqdm

            bar = tqdm(total=info.total, unit="B", unit_scale=True, desc="download", file=sys.stdout)
            bar.update(info.done)
        bar.update(info.done - bar.n)
        bar.set_postfix_str(f"{info.files_done}/{info.files_total} files", refresh=False)

    try:
        return ensure_model(args.model, args.models_dir, progress=progress,
                            announce=lambda line: print(line, flush=True))
    finally:
        if bar is not None:
            bar.close()


def pick_device(requested: str | None) -> torch.device:
    """--device, or the first CUDA GPU when there is one, else the CPU; says which and why."""
    if requested:
        device = torch.device(requested)
        print(f"device: {device} (--device)", flush=True)
        return device
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        print(f"device: cuda:0 ({props.name}, {props.total_memory / 1e9:.0f} GB), the GPU found", flush=True)
        return torch.device("cuda:0")
    print("device: cpu (no CUDA GPU found)", flush=True)
    return torch.device("cpu")


def cpu_warning(files) -> str | None:
    """What running this model on the CPU costs, when that is hours and tens of GB."""
    size = sum(p.stat().st_size for p in files.transformer_weights)
    if size > CPU_HEAVY_BYTES:
        return ("warning: a 12B model on the CPU needs about 50 GB of RAM and takes hours per video. "
                "Use EasyAnimateV5-7b-zh-InP (or -7b-zh), a machine with a CUDA GPU, or fewer --frames/--steps.")
    return ("note: on the CPU a video takes a long time (tens of minutes to hours); a CUDA GPU is much faster.")


def _generate(args) -> int:
    model_dir = _model_folder(args)
    files = validate_model_dir(model_dir)
    if args.parallel and args.long:
        raise EasyAnimateError("--long cannot be combined with --parallel yet: run the long video on one GPU")
    if args.parallel:  # torchrun: each rank takes its own GPU (cuda:LOCAL_RANK) in init_distributed below
        device = torch.device(args.device) if args.device else torch.device(
            "cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = pick_device(args.device)
        if device.type == "cpu":
            print(cpu_warning(files), flush=True)
        args.device = str(device)
    dtype = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
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
    cache = CacheSettings.parse(args.cache) if args.cache else None

    say = print
    if args.parallel:
        from .parallel import init_distributed, parse_parallel

        parse_parallel(args.parallel)  # a bad spec fails here, before any process group
        device = init_distributed(args.device, args.backend)
        if torch.distributed.get_rank() != 0:
            def say(*_, **__):  # only rank 0 reports
                return None
    t0 = time.perf_counter()
    say(f"loading {model_dir} on {device} ({dtype})" + (f", {args.parallel}" if args.parallel else "") + "…",
        flush=True)
    pipe = load_pipeline(model_dir, device=device, dtype=dtype,
                         memory=requested_mode(args.memory, args.swap_blocks), swap_blocks=args.swap_blocks,
                         plan_for=(height, width, args.chunk_frames if args.long else args.frames),
                         parallel=args.parallel)
    say(pipe.memory_plan.describe(), flush=True)
    if args.vae_tile:
        pipe.set_vae_tiling(True, args.vae_tile)
    say(f"loaded a {pipe.kind} model in {time.perf_counter() - t0:.1f}s; generating {height}x{width}", flush=True)
    t1 = time.perf_counter()

    def progress(info):
        elapsed = time.perf_counter() - t1
        say(f"step {info.step}/{info.total} (t={info.timestep:.0f}) {elapsed:.1f}s", flush=True)

    if args.long:
        return _generate_long(args, pipe, height, width, start, end, control, t0)
    if len(args.prompt) > 1:
        raise EasyAnimateError("several --prompt values are for long videos (one per chunk): add --long")
    result = pipe.generate(args.prompt[0], negative_prompt=args.negative_prompt, height=height, width=width,
                           num_frames=args.frames, num_inference_steps=args.steps, guidance_scale=args.cfg,
                           sampler=args.sampler, seed=args.seed, start_image=start, end_image=end, video=video,
                           mask=mask, strength=strength, control_video=control, callback=progress, cache=cache)
    if result.frames is None:  # a parallel rank other than 0: rank 0 writes the video
        return 0
    if result.cache_stats is not None:
        print(f"step cache: {result.cache_stats.describe()}", flush=True)
    return _write_output(args, result.frames, t0)


def _generate_long(args, pipe, height, width, start, end, control, t0) -> int:
    from .long_video import generate_long

    if args.video or args.mask:
        raise EasyAnimateError("--long takes --start-image, --end-image or --control-video, not --video/--mask")
    t1 = time.perf_counter()

    def progress(info):
        print(f"chunk {info.chunk + 1}/{info.chunks} step {info.step}/{info.total} (t={info.timestep:.0f}) "
              f"{time.perf_counter() - t1:.1f}s", flush=True)

    result = generate_long(pipe, args.prompt, args.negative_prompt, height=height, width=width,
                           num_frames=args.frames, chunk_frames=args.chunk_frames, overlap_frames=args.overlap,
                           mode=args.long, num_inference_steps=args.steps, guidance_scale=args.cfg,
                           sampler=args.sampler, seed=args.seed, start_image=start, end_image=end,
                           control_video=control, callback=progress, fuse=args.fuse)
    for note in result.notes:
        print(f"note: {note}", flush=True)
    return _write_output(args, result.frames, t0, summary=f"{result.describe()}; ")


def _write_output(args, frames, t0: float, summary: str = "") -> int:
    """Write the frames to --out and say what was written, and how long the whole run took."""
    path = write_video(args.out, frames, fps=args.fps)
    print(f"{summary}wrote {path}: {frames.shape[0]} frames {frames.shape[1]}x{frames.shape[2]} at {args.fps:g} fps "
          f"in {time.perf_counter() - t0:.1f}s", flush=True)
    return 0


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "check":
            files = validate_model_dir(_model_folder(args))
            load_tokenizers(files.root)  # damaged tokenizer files are found here, not at the first prompt
            print(f"{files.root}: EasyAnimate V5 {files.kind} model, all files present")
            return 0
        if args.command == "train-lora":
            from .training.cli import run as train_lora

            return train_lora(args)
        if args.command == "calibrate-cache":
            return _calibrate(args)
        return _generate(args)
    except (EasyAnimateError, FileNotFoundError, ValueError) as exc:  # ModelDownloadError is an EasyAnimateError
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        if getattr(args, "parallel", None) and torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
