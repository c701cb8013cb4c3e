"""Which training memory options fit a GPU: estimates from shapes (nothing is allocated), not yet measured on a GPU.

    plan = plan_training(TRANSFORMER_12B, 24 * GB, height=512, width=512, frames=49, rank=32)
    print(plan.describe())

Terms of the estimate (bytes, compute dtype bf16):
- frozen weights: the transformer in bf16 or fp8 (memory.transformer_sizes), minus the swapped blocks,
  plus two device slots of the largest swapped block (block_swap.py);
- trainable state: LoRA parameters (rank × (in + out) per target Linear) × 16 bytes: fp32 value, fp32
  gradient and AdamW's two fp32 moments;
- activations kept for the backward: measured on the CPU with a saved-tensor hook over one forward
  (29-39 × U per block, U = (video + text tokens) × hidden × element bytes; 34 used). With gradient
  checkpointing only each block's inputs (x, ctx: U per block) are kept, plus one block's
  activations while it is recomputed;
- working memory of one forward: memory.estimate_working_bytes (13 U + one Linear weight);
- fp8: each Linear's dequantised bf16 weight is saved for the backward: the whole blocks' bf16 size
  without checkpointing, one block's with it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache

import torch

from ..memory import GB, TEXT_TOKENS, default_reserve, estimate_working_bytes, transformer_sizes
from .adapter import target_filter

ACTIVATION_PER_U_PER_BLOCK = 34.0
CHECKPOINT_INPUTS_PER_U_PER_BLOCK = 1.0  # x [B, Lv, D] + ctx [B, Lt, D] = exactly U
TRAINABLE_BYTES_PER_PARAM = 16  # fp32 param + grad + 2 AdamW moments

_FULL = dict(in_channels=33, num_attention_heads=48, attention_head_dim=64, time_embed_dim=512, text_embed_dim=1024,
             text_embed_dim_t5=2048, add_noise_in_inpaint_model=True)
TRANSFORMER_12B = dict(_FULL, num_layers=48, mmdit_layers=48)
TRANSFORMER_7B = dict(_FULL, num_layers=36, mmdit_layers=18)


@dataclass(frozen=True)
class TrainingOptions:
    fp8: bool = False
    gradient_checkpointing: bool = False
    swap_blocks: int = 0

    def label(self) -> str:
        parts = ["fp8" if self.fp8 else "bf16"]
        if self.gradient_checkpointing:
            parts.append("gradient checkpointing")
        if self.swap_blocks:
            parts.append(f"{self.swap_blocks} blocks swapped")
        return " + ".join(parts)


@dataclass
class TrainingEstimate:
    options: TrainingOptions
    parts: dict[str, int] = field(default_factory=dict)

    @property
    def peak(self) -> int:
        return sum(self.parts.values())


@dataclass
class TrainingPlan:
    budget: int
    chosen: TrainingEstimate | None
    tried: list[TrainingEstimate]

    def describe(self) -> str:
        lines = [f"GPU budget {self.budget / GB:.1f} GB (estimates, not measured):"]
        for e in self.tried:
            mark = "fits" if e.peak <= self.budget else "too big"
            detail = ", ".join(f"{k} {v / GB:.1f}" for k, v in e.parts.items())
            lines.append(f"  {e.options.label()}: {e.peak / GB:.1f} GB ({detail}) -> {mark}")
        lines.append(f"choose: {self.chosen.options.label()}" if self.chosen else "nothing fits: lower the resolution "
                     "or frames, or the rank")
        return "\n".join(lines)


def lora_parameter_count(config: dict, rank: int, targets: str = "all") -> int:
    """LoRA parameters for a transformer config (built on the meta device)."""
    return rank * _lora_sides(json.dumps(config, sort_keys=True), targets)


@lru_cache(maxsize=16)
def _lora_sides(config_json: str, targets: str) -> int:
    from ..models.transformer import EasyAnimateTransformer3D

    include = target_filter(targets)
    with torch.device("meta"):
        model = EasyAnimateTransformer3D.from_config_dict(json.loads(config_json))
    return sum(m.in_features + m.out_features for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and include(n))


@lru_cache(maxsize=16)
def _sizes(config_json: str, dtype: torch.dtype, fp8: bool) -> tuple[int, tuple[int, ...]]:
    return transformer_sizes(json.loads(config_json), dtype, fp8=fp8)


def estimate_training(config: dict, options: TrainingOptions, *, height: int, width: int, frames: int, rank: int,
                      targets: str = "all", dtype: torch.dtype = torch.bfloat16) -> TrainingEstimate:
    """Estimated peak device bytes of one LoRA training step (batch 1, no guidance) with `options`."""
    from ..models.transformer import TransformerConfig

    cfg = TransformerConfig.from_dict(config)
    e = torch.empty((), dtype=dtype).element_size()
    key = json.dumps(config, sort_keys=True)
    total, blocks = _sizes(key, dtype, options.fp8)
    _, blocks_bf16 = _sizes(key, dtype, False)
    swapped = blocks[len(blocks) - options.swap_blocks:] if options.swap_blocks else ()
    weights = total - sum(swapped) + (2 * max(swapped) if swapped else 0)

    latent_frames = (frames - 1) // 4 + 1
    tokens = latent_frames * (height // (8 * cfg.patch_size)) * (width // (8 * cfg.patch_size)) + TEXT_TOKENS
    unit = tokens * cfg.inner_dim * e
    layers = cfg.num_layers
    checkpointing = options.gradient_checkpointing or bool(options.swap_blocks)
    if checkpointing:
        saved = int((CHECKPOINT_INPUTS_PER_U_PER_BLOCK * layers + ACTIVATION_PER_U_PER_BLOCK) * unit)
    else:
        saved = int(ACTIVATION_PER_U_PER_BLOCK * layers * unit)
    working = estimate_working_bytes(height, width, frames, guidance=False, dtype=dtype, hidden=cfg.inner_dim,
                                     patch_size=cfg.patch_size)["transformer"]
    parts = {"weights": weights, "LoRA+AdamW": lora_parameter_count(config, rank, targets) * TRAINABLE_BYTES_PER_PARAM,
             "saved activations": saved, "working": working}
    if options.fp8:
        parts["fp8 dequantised"] = max(blocks_bf16) if checkpointing else sum(blocks_bf16)
    return TrainingEstimate(options, parts)


def plan_training(config: dict, gpu_bytes: int, *, height: int = 512, width: int = 512, frames: int = 49,
                  rank: int = 32, targets: str = "all", dtype: torch.dtype = torch.bfloat16) -> TrainingPlan:
    """The first of: bf16; bf16 + checkpointing; fp8 + checkpointing; fp8 + checkpointing + the fewest swapped
    blocks that fit a GPU of `gpu_bytes` (minus the inference planner's reserve)."""
    from ..models.transformer import TransformerConfig

    budget = gpu_bytes - default_reserve(gpu_bytes)
    layers = TransformerConfig.from_dict(config).num_layers
    kw = dict(height=height, width=width, frames=frames, rank=rank, targets=targets, dtype=dtype)
    tried = []
    for options in (TrainingOptions(), TrainingOptions(gradient_checkpointing=True),
                    TrainingOptions(fp8=True, gradient_checkpointing=True)):
        tried.append(estimate_training(config, options, **kw))
        if tried[-1].peak <= budget:
            return TrainingPlan(budget, tried[-1], tried)
    for n in range(1, layers + 1):
        estimate = estimate_training(config, TrainingOptions(True, True, n), **kw)
        if estimate.peak <= budget or n == layers:
            tried.append(estimate)
            if estimate.peak <= budget:
                return TrainingPlan(budget, estimate, tried)
    return TrainingPlan(budget, None, tried)
