"""EasyAnimate V5 in plain PyTorch: load a model folder, generate videos. No ComfyUI imports here.

    from easyanimate_core import load_pipeline
    pipe = load_pipeline("models/EasyAnimateV5-12b-zh-InP", device="cuda", dtype=torch.bfloat16)
    out = pipe.generate("A cat playing guitar", num_frames=49)
    out.frames  # [F,H,W,3] float32 0..1
"""
from __future__ import annotations

from pathlib import Path

import torch

from .buckets import bucket_size, round_frames
from .errors import CheckpointError, EasyAnimateError, ModelFolderError, UnsupportedRequestError
from .loading import load_weights_into, validate_model_dir
from .pipeline import DEFAULT_NEGATIVE_PROMPT, GenerationResult, Pipeline, StepInfo
from .samplers import SAMPLER_NAMES
from .text import PromptEmbeds, TextEncoders

__all__ = [
    "load_pipeline", "load_transformer", "auto_dtype", "resolve_dtype", "load_vae", "Pipeline", "GenerationResult", "StepInfo", "PromptEmbeds",
    "TextEncoders", "SAMPLER_NAMES", "DEFAULT_NEGATIVE_PROMPT", "bucket_size", "round_frames",
    "EasyAnimateError", "ModelFolderError", "CheckpointError", "UnsupportedRequestError",
]

_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
           "fp16": torch.float16, "float16": torch.float16}


def resolve_dtype(dtype) -> torch.dtype:
    """Accept a torch dtype or one of 'fp32', 'bf16', 'fp16'."""
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise UnsupportedRequestError(f"dtype {dtype} is not supported; use float32, bfloat16 or float16")
        return dtype
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise UnsupportedRequestError(f"unknown dtype {dtype!r}; use fp32, bf16 or fp16") from None


def auto_dtype(device) -> torch.dtype:
    """The precision to run in on a device: fp32 on CPU, bf16 on GPUs that have it, fp16 otherwise."""
    device = torch.device(device)
    if device.type == "cpu":
        return torch.float32
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float16


def load_transformer(files, *, dtype: torch.dtype, device="cpu", fp8: bool = False):
    """The V5 transformer of a validated model folder, built on the meta device and filled in place.

    `dtype` is the compute dtype. With `fp8`, the Linears of the transformer blocks are stored as
    float8_e4m3fn with per-channel scales (about half the bytes of bf16, see fp8.py), quantised
    tensor by tensor while reading; everything else, and every activation, stays in `dtype`.
    """
    from .models.transformer import EasyAnimateTransformer3D

    with torch.device("meta"):
        model = EasyAnimateTransformer3D.from_config_dict(files.transformer_config)
    if fp8:
        from .fp8 import load_fp8_weights_into

        return load_fp8_weights_into(model, files.transformer_weights, dtype=dtype, device=device)
    return load_weights_into(model, files.transformer_weights, dtype=dtype, device=device)


def load_vae(files, *, dtype: torch.dtype, device="cpu"):
    """The MagViT VAE of a validated model folder (fp16 is upcast to fp32, as the original does)."""
    from .models.vae import MagvitVAE

    vae_dtype = torch.float32 if dtype == torch.float16 else dtype
    with torch.device("meta"):
        model = MagvitVAE.from_config_dict(files.vae_config)
    return load_weights_into(model, files.vae_weights, dtype=vae_dtype, device=device)


@torch.inference_mode(False)  # plain tensors even when called under inference_mode (ComfyUI runs nodes so)
def load_pipeline(model_dir: str | Path, device: str | torch.device = "cpu", dtype=torch.float32,
                  fp8: bool = False, memory: str = "gpu", swap_blocks: int | None = None,
                  plan_for: tuple[int, int, int] | None = None, parallel=None) -> Pipeline:
    """Validate a model folder (original layout) and load every component onto `device` in `dtype`.

    `fp8=True` stores the transformer blocks' Linear weights in float8 (computing in `dtype`).
    `memory` is a memory mode (memory.py): "gpu" (all resident), "offload", "fp8", "block_swap",
    "fp8_block_swap" or "auto"; with offload the weights are loaded onto the CPU and each component
    moves to `device` only for its stage. `swap_blocks` is N for the block-swap modes (None: the
    fewest that fit). "auto" plans for a `plan_for` = (height, width, frames) video (default
    384x672x49) in the device's free memory. `pipe.memory_plan.describe()` says what was chosen.

    `parallel` ("ulysses=2,cfg=2", see easyanimate_core/parallel): call on every rank of an initialised
    torch.distributed process group; returns a ParallelPipeline whose stages all ranks call together.
    Rank 0 loads everything, the other ranks the transformer only; the memory mode applies on each rank.
    """
    from .memory import apply_plan, plan_for_files

    dtype = resolve_dtype(dtype)
    device = torch.device(device)
    files = validate_model_dir(model_dir)
    pipeline_class, extra = Pipeline, {}
    if parallel is not None:
        from .parallel import ParallelPipeline, make_groups
        from .models.transformer import TransformerConfig

        heads = TransformerConfig.from_dict(files.transformer_config).num_attention_heads
        pipeline_class, extra = ParallelPipeline, {"groups": make_groups(parallel, heads=heads)}
    driver = parallel is None or extra["groups"].is_driver  # the rank that encodes text, prepares and decodes
    plan = plan_for_files(files, memory, device, dtype, fp8=fp8, swap_blocks=swap_blocks, plan_for=plan_for)
    home = torch.device("cpu") if plan.offload else device  # where the weights live between stages
    text_dtype = torch.bfloat16 if dtype == torch.float16 else dtype  # mT5 overflows in fp16
    return apply_plan(pipeline_class(
        **extra,
        transformer=load_transformer(files, dtype=dtype, device=home, fp8=plan.fp8),
        vae=load_vae(files, dtype=dtype, device=home) if driver else None,
        text_encoders=TextEncoders.from_model_dir(files.root, dtype=text_dtype, device=home) if driver else None,
        scheduler_config=files.scheduler_config,
        kind=files.kind,
        add_noise_in_inpaint_model=bool(files.transformer_config.get("add_noise_in_inpaint_model", False)),
        device=device,
        dtype=dtype,
        model_dir=files.root,
    ), plan)
