"""One optimizer step of LoRA (or full) training on latents that are already encoded.

    trainer = LoraTrainer(pipe, rank=4, alpha=2.0, lr=1e-3, initial_lora=None)
    loss = trainer.step(latents, prompt_embeds, prompt_embeds_2, timesteps, noise, inpaint_latents=None)
    trainer.lora_state_dict()   # {original kohya key: tensor}
    trainer.save(path)          # the LoRA file (temporary name, then rename)

`pipe` is anything with `.transformer` and `.scheduler_config` (a core Pipeline). The transformer's
own weights are never written by LoraTrainer: the factors live in a LoraAdapter whose hooks are
attached only inside `step`, so the same model samples without the LoRA between steps.
The objective is the original's (objective.py); the defaults are the original script's: AdamW
(betas 0.9/0.999, eps 1e-8, weight decay 1e-2), constant lr, max_grad_norm 1.0 with its decaying
clip threshold, LoRA init kaiming-uniform down / zero up.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor

from ..block_swap import get_block_swap, reset_block_swap
from ..errors import EasyAnimateError, UnsupportedRequestError
from . import objective
from .adapter import LoraAdapter
from .checkpointing import blocks_runner, checkpointed_runner
from .files import save_safetensors_atomic


class NonFiniteLossError(EasyAnimateError, FloatingPointError):
    """The loss became NaN or infinite; the parameters were not updated by that step."""


class _Trainer:
    """What LoRA and full training share: the objective, clipping, AdamW, the step counter."""

    def __init__(self, pipe, params: list[Tensor], lr: float, *, weight_decay: float, betas: tuple[float, float],
                 eps: float, max_grad_norm: float, warmup_steps: int, gradient_checkpointing: bool):
        if lr <= 0:
            raise UnsupportedRequestError(f"learning rate must be positive, got {lr}")
        self.pipe = pipe
        self.transformer = pipe.transformer
        self.noise_scheduler = objective.make_noise_scheduler(pipe.scheduler_config)
        self.params = params
        self.lr = float(lr)
        self.max_grad_norm = float(max_grad_norm)
        self.warmup_steps = int(warmup_steps)
        # Block swap needs the recomputation: without it the backward would meet swapped-out weights.
        self.gradient_checkpointing = bool(gradient_checkpointing) or get_block_swap(self.transformer) is not None
        foreach = all(p.device.type == "cuda" for p in params) or None
        self.optimizer = torch.optim.AdamW(params, lr=self.lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                           foreach=foreach if foreach else False)
        self.global_step = 0
        self.last_grad_norm = float("nan")

    @property
    def device(self) -> torch.device:
        return self.params[0].device

    def _hooks(self):
        """A context manager active while the transformer runs a training forward/backward."""
        raise NotImplementedError

    @torch.inference_mode(False)  # ordinary tensors even when called under inference_mode (ComfyUI runs nodes so)
    def step(self, latents: Tensor, prompt_embeds: Tensor, prompt_embeds_2: Tensor, timesteps: Tensor,
             noise: Tensor, inpaint_latents: Tensor | None = None) -> float:
        """One optimizer step on a batch; returns the loss (float). Raises NonFiniteLossError, leaving the
        parameters and optimizer state untouched, when the loss or the gradients are not finite."""
        transformer = self.transformer
        kind_in = transformer.config.in_channels
        extra = 0 if inpaint_latents is None else inpaint_latents.shape[1]
        if latents.shape[1] + extra != kind_in:
            need = "inpaint_latents (17 channels: mask + masked-video latents)" if kind_in == 33 else "no inpaint_latents"
            raise UnsupportedRequestError(
                f"this model takes {kind_in} input channels but got latents with {latents.shape[1]} and "
                f"{extra} inpaint channels: an {'InP' if kind_in == 33 else 'T2V'} model needs {need}")
        device = self.device
        latents, noise = _plain(latents, device, torch.float32), _plain(noise, device, torch.float32)
        prompt_embeds, prompt_embeds_2 = _plain(prompt_embeds, device), _plain(prompt_embeds_2, device)
        inpaint_latents = None if inpaint_latents is None else _plain(inpaint_latents, device)
        timesteps = timesteps.to(device).long()
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        target = self.noise_scheduler.get_velocity(latents, noise, timesteps)
        lt = latents.shape[2]
        rope = transformer.rope(lt, latents.shape[3] // transformer.config.patch_size,
                                latents.shape[4] // transformer.config.patch_size, device)

        self.optimizer.zero_grad(set_to_none=True)
        runner = checkpointed_runner if self.gradient_checkpointing else None
        try:
            with torch.enable_grad(), self._hooks(), blocks_runner(transformer, runner):
                pred = transformer(noisy, timesteps.float(), prompt_embeds, encoder_hidden_states_t5=prompt_embeds_2,
                                   inpaint_latents=inpaint_latents, image_rotary_emb=rope)
                loss = objective.masked_mse(pred, target)
                if not torch.isfinite(loss):
                    raise NonFiniteLossError(self._nan_message(loss))
                loss.backward()
        except BaseException:
            self.optimizer.zero_grad(set_to_none=True)
            raise
        finally:
            reset_block_swap(transformer)

        for p in self.params:
            if p.grad is None:
                # A layer outside the loss's graph (the last MMDiT block's text stream): the original computes
                # the discarded text tokens, so its factors get zero gradients and still decay with AdamW.
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in self.params]
        total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.detach(), 2) for g in grads]), 2)
        self.last_grad_norm = float(total)
        if not math.isfinite(self.last_grad_norm):
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLossError(f"the gradients became {self.last_grad_norm} at step {self.global_step + 1} "
                                     "(loss was finite); " + self._nan_hint())
        max_norm = objective.clip_threshold(self.global_step, self.last_grad_norm, self.max_grad_norm)
        torch.nn.utils.clip_grad_norm_(self.params, max_norm)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr * objective.lr_factor(self.global_step, self.warmup_steps)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.global_step += 1
        return float(loss.detach())

    def _nan_message(self, loss: Tensor) -> str:
        return f"the loss became {float(loss)} at step {self.global_step + 1}; " + self._nan_hint()

    def _nan_hint(self) -> str:
        return (f"nothing was updated by this step. Lower the learning rate (now {self.lr:g}), add warm-up steps, or "
                "train in fp32/bf16 instead of fp16; the last saved file is kept.")

    # ------------------------------------------------------------------ resume
    def training_state(self) -> dict:
        """Optimizer state and step counter (for `torch.save`), to resume exactly."""
        return {"global_step": self.global_step, "optimizer": self.optimizer.state_dict()}

    @torch.inference_mode(False)
    def load_training_state(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.global_step = int(state["global_step"])


class LoraTrainer(_Trainer):
    """LoRA training on the transformer's Linears (all by default, as the original; "attention" for q/k/v/out).

    Keyword options (defaults = the original script's): targets, weight_decay, betas, eps, max_grad_norm,
    warmup_steps (0: constant lr), seed (the LoRA init; None: the global torch RNG), gradient_checkpointing.
    """

    def __init__(self, pipe, rank: int = 4, alpha: float = 2.0, lr: float = 1e-3, initial_lora=None, *,
                 targets: str = "all", weight_decay: float = 1e-2, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, max_grad_norm: float = objective.MAX_GRAD_NORM, warmup_steps: int = 0,
                 seed: int | None = None, gradient_checkpointing: bool = False):
        generator = torch.Generator().manual_seed(int(seed)) if seed is not None else None
        with torch.inference_mode(False):  # ordinary tensors even when called under inference_mode (ComfyUI)
            self.adapter = LoraAdapter(pipe.transformer, rank, alpha, targets, generator)
            if initial_lora is not None:
                self.adapter.load_kohya(_as_state(initial_lora))
        super().__init__(pipe, list(self.adapter.parameters()), lr, weight_decay=weight_decay, betas=betas, eps=eps,
                         max_grad_norm=max_grad_norm, warmup_steps=warmup_steps,
                         gradient_checkpointing=gradient_checkpointing)

    @property
    def rank(self) -> int:
        return self.adapter.rank

    @property
    def alpha(self) -> float:
        return self.adapter.alpha

    def _hooks(self):
        return _attached(self.adapter)

    def lora_state_dict(self, dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
        """{original kohya key: tensor} on the CPU: lora_down, lora_up and alpha of every target."""
        return self.adapter.state_dict_kohya(dtype)

    def save(self, path, metadata: dict[str, str] | None = None, dtype: torch.dtype = torch.float32) -> Path:
        """Write the LoRA file (kohya keys, `dtype`, string metadata) through a temporary name, then rename."""
        return save_safetensors_atomic(path, self.lora_state_dict(dtype), metadata)


class FullTrainer(_Trainer):
    """Every floating transformer weight trainable (for small models, e.g. test models). Changes the model."""

    def __init__(self, pipe, lr: float = 1e-4, *, weight_decay: float = 1e-2, betas=(0.9, 0.999), eps: float = 1e-8,
                 max_grad_norm: float = objective.MAX_GRAD_NORM, warmup_steps: int = 0,
                 gradient_checkpointing: bool = False):
        transformer = pipe.transformer
        if get_block_swap(transformer) is not None:
            raise UnsupportedRequestError("full fine-tuning cannot run with block swap: every weight must stay "
                                          "resident to be updated. Train a LoRA, or load without block swap.")
        params = [p for p in transformer.parameters() if p.is_floating_point() and p.dtype.itemsize > 1]
        if len(params) != len(list(transformer.parameters())):
            raise UnsupportedRequestError("full fine-tuning needs a transformer without fp8 weights; load it in "
                                          "fp32 or bf16")
        for p in params:
            if p.is_inference():
                raise UnsupportedRequestError("full fine-tuning needs a model loaded outside inference_mode")
            p.requires_grad_(True)
        super().__init__(pipe, params, lr, weight_decay=weight_decay, betas=betas, eps=eps,
                         max_grad_norm=max_grad_norm, warmup_steps=warmup_steps,
                         gradient_checkpointing=gradient_checkpointing)

    def _hooks(self):
        return _nothing()

    def state_dict(self) -> dict[str, Tensor]:
        return {k: v.detach().to("cpu").contiguous() for k, v in self.transformer.state_dict().items()}

    def save(self, path, metadata: dict[str, str] | None = None) -> Path:
        """Write the transformer's weights (diffusion_pytorch_model.safetensors layout), atomically."""
        return save_safetensors_atomic(path, self.state_dict(), metadata)

    def finish(self) -> None:
        """Freeze the weights again (the model is then an ordinary inference model)."""
        for p in self.params:
            p.requires_grad_(False)
            p.grad = None


class _attached:
    def __init__(self, adapter: LoraAdapter):
        self.adapter = adapter

    def __enter__(self):
        self.adapter.attach()

    def __exit__(self, *exc):
        self.adapter.detach()


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return None


def _plain(t: Tensor, device, dtype=None) -> Tensor:
    """`t` on `device` as an ordinary tensor (inputs made under inference_mode cannot enter autograd)."""
    t = t.to(device, dtype)
    return t.clone() if t.is_inference() else t


def _as_state(initial) -> dict[str, Tensor]:
    if isinstance(initial, dict):
        return initial
    from ..safetensors_io import load_file

    return load_file(initial)
