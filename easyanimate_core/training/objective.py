"""The V5 training objective, as the original `scripts/train_lora.py` computes it (with --not_sigma_loss).

- Schedule: DDPMScheduler built from the model's scheduler_config.json (zero-SNR scaled-linear betas).
- Timesteps: uniform integers in [0, 1000); noise: standard normal; both from one seeded generator,
  noise first, then the timestep, every step.
- Input: add_noise(latents, noise, t) = sqrt(acp_t) * latents + sqrt(1 - acp_t) * noise.
- Target: the velocity sqrt(acp_t) * noise - sqrt(1 - acp_t) * latents.
- Loss: mean over all elements of (pred - target)^2 where |pred - target| <= 50 (0 elsewhere), float32.
- Clipping: max_norm decays linearly from 5 * max_grad_norm to max_grad_norm over the first 1000
  steps; after that, a step whose norm exceeds 5 * max_norm is clipped to max_norm / min(norm / max_norm, 10).
"""
from __future__ import annotations

import warnings

import torch
from torch import Tensor

LOSS_THRESHOLD = 50.0
NUM_TRAIN_TIMESTEPS = 1000
MAX_GRAD_NORM = 1.0
INITIAL_GRAD_NORM_RATIO = 5
ABNORMAL_NORM_CLIP_START = 1000


def make_noise_scheduler(scheduler_config: dict):
    """diffusers' DDPMScheduler from the model's scheduler_config.json, as the original trainer builds it."""
    from diffusers import DDPMScheduler
    from diffusers.utils import logging as diffusers_logging

    config = {k: v for k, v in scheduler_config.items() if not k.startswith("_")}
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # keys of the DDIM config that DDPM does not use (snr_shift_scale)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return DDPMScheduler.from_config(config)
    finally:
        diffusers_logging.set_verbosity(verbosity)


def draw_noise_and_timesteps(latents_shape, generator: torch.Generator, num_timesteps: int = NUM_TRAIN_TIMESTEPS):
    """(noise, timesteps) in the original's order: randn of the latents' shape, then randint per sample."""
    noise = torch.randn(latents_shape, generator=generator)
    timesteps = torch.randint(0, num_timesteps, (latents_shape[0],), generator=generator)
    return noise, timesteps


def masked_mse(pred: Tensor, target: Tensor, threshold: float = LOSS_THRESHOLD) -> Tensor:
    """mean((pred - target)^2 * (|pred - target| <= threshold)) in float32 (the original's custom_mse_loss)."""
    pred, target = pred.float(), target.float()
    diff = pred - target
    mask = (diff.abs() <= threshold).float()
    return (torch.nn.functional.mse_loss(pred, target, reduction="none") * mask).mean()


def linear_decay(initial: float, final: float, total_steps: int, step: int) -> float:
    if step >= total_steps:
        return final
    step = max(0, step)
    return initial + (final - initial) / total_steps * step


def clip_threshold(global_step: int, total_norm: float, max_grad_norm: float = MAX_GRAD_NORM) -> float:
    """The max_norm the original passes to clip_grad_norm_ at `global_step` (0-based, before the update)."""
    max_norm = linear_decay(max_grad_norm * INITIAL_GRAD_NORM_RATIO, max_grad_norm, ABNORMAL_NORM_CLIP_START,
                            global_step)
    if total_norm / max_norm > 5 and global_step > ABNORMAL_NORM_CLIP_START:
        return max_norm / min(total_norm / max_norm, 10)
    return max_norm


def lr_factor(step: int, warmup_steps: int) -> float:
    """Constant learning rate, with an optional linear warm-up over the first `warmup_steps` steps."""
    if warmup_steps <= 0:
        return 1.0
    return min(1.0, (step + 1) / warmup_steps)
