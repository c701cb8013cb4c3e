"""A whole LoRA training run over cached samples: sampling order, caption dropout, saves, resume, logs.

    result = train_lora(pipe, samples, empty_caption, TrainConfig(steps=500), "style.safetensors")

Every random draw comes from `config.seed`: the sample order (python random), the VAE posterior
samples and caption dropout (one torch generator), and, as in the original, the diffusion noise then
the timestep (another torch generator). A run can be resumed from its last save: the LoRA file plus
`<out>.state.pt` (optimizer state, step, generator states, loss history) continue it exactly.

Failures keep what was trained: a NaN/inf loss stops the run with a clear message and leaves the last
save untouched; any other interruption (Cancel, Ctrl-C, an error) saves the steps done so far first.
Every file is written under a temporary name, then renamed.
"""
from __future__ import annotations

import csv
import random
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..errors import UnsupportedRequestError
from .cache import CachedSample
from .files import torch_save_atomic
from .trainer import LoraTrainer, NonFiniteLossError

STATE_SUFFIX = ".state.pt"
T2V_FLAG_ZERO_PROBABILITY = 0.9  # the original: a full mask conditions on zeros 90 % of the time


@dataclass
class TrainConfig:
    """Settings of a run (defaults for users' GPUs: rank 32, alpha 32; the original's are 128/64)."""

    steps: int = 500
    rank: int = 32
    alpha: float = 32.0
    lr: float = 1e-4
    seed: int = 42
    targets: str = "all"
    warmup_steps: int = 0
    save_every: int = 0               # 0: only at the end
    caption_dropout: float = 0.1      # the original's text_drop_ratio
    gradient_checkpointing: bool = False
    trigger_words: str = ""
    save_dtype: str = "float32"       # float32 (the original without mixed precision) or bfloat16

    def validate(self) -> None:
        if self.steps < 1:
            raise UnsupportedRequestError(f"steps must be at least 1, got {self.steps}")
        if not 0.0 <= self.caption_dropout < 1.0:
            raise UnsupportedRequestError(f"caption_dropout must be in [0, 1), got {self.caption_dropout}")
        if self.save_dtype not in ("float32", "bfloat16"):
            raise UnsupportedRequestError(f"save_dtype must be float32 or bfloat16, got {self.save_dtype!r}")


@dataclass
class TrainResult:
    path: Path | None                  # the LoRA file (None if no step finished)
    steps_done: int
    losses: list[float] = field(default_factory=list)


def state_path(out: Path) -> Path:
    return out.with_name(out.name + STATE_SUFFIX)


def _metadata(config: TrainConfig, steps_done: int, samples: list[CachedSample], base_model: str) -> dict[str, str]:
    shape = samples[0].latent_shape
    frames = (shape[2] - 1) * 4 + 1
    return {
        "ss_base_model_version": "EasyAnimateV5", "ss_sd_model_name": base_model,
        "ss_network_module": "easyanimate_core.training", "ss_network_dim": str(config.rank),
        "ss_network_alpha": f"{config.alpha:g}", "ss_steps": str(steps_done),
        "ss_resolution": f"{shape[3] * 8}x{shape[4] * 8}x{frames}", "ss_num_train_images": str(len(samples)),
        "ss_learning_rate": f"{config.lr:g}", "ss_seed": str(config.seed), "ss_lora_targets": config.targets,
        "ss_tag_frequency": "", "trigger_words": config.trigger_words,
    }


def _schedule(samples: list[CachedSample], rng: random.Random) -> list[int]:
    """One epoch: every sample `repeat` times, shuffled."""
    order = [i for i, s in enumerate(samples) for _ in range(max(1, s.repeat))]
    rng.shuffle(order)
    return order


def _inpaint_latents(sample: CachedSample, latents: torch.Tensor, draw: torch.Generator, scaling: float):
    """The original's full-mask conditioning: zeros with p 0.9, else [0 mask ; blank-video latents]."""
    if sample.blank_mean is None:
        raise UnsupportedRequestError(
            "this is an InP model but the training cache was made for a text-to-video model (no blank-video "
            "latents); rebuild the cache with this model (rebuild_cache / --rebuild-cache)")
    zeros = torch.zeros((latents.shape[0], 1 + latents.shape[1]) + latents.shape[2:])
    if float(torch.rand((), generator=draw)) < T2V_FLAG_ZERO_PROBABILITY:
        return zeros
    blank = sample.blank_mean + sample.blank_std * torch.randn(sample.blank_mean.shape, generator=draw)
    return torch.cat([zeros[:, :1], blank], dim=1) * scaling


def _draw_batch(sample: CachedSample, pipe, empty_caption, config: TrainConfig, draw: torch.Generator,
                noise_rng: torch.Generator, vae_scaling_factor: float):
    """(latents, bert, t5, timesteps, noise, inpaint) for one step, drawing in a fixed order from the seeds."""
    latents = (sample.mean + sample.std * torch.randn(sample.mean.shape, generator=draw)) * vae_scaling_factor
    bert, t5 = sample.bert, sample.t5
    if float(torch.rand((), generator=draw)) < config.caption_dropout:
        bert, t5 = empty_caption
    inpaint = (_inpaint_latents(sample, latents, draw, vae_scaling_factor)
               if pipe.transformer.config.in_channels == 33 else None)
    noise = torch.randn(latents.shape, generator=noise_rng)
    timesteps = torch.randint(0, 1000, (latents.shape[0],), generator=noise_rng)
    return latents, bert, t5, timesteps, noise, inpaint


def train_lora(pipe, samples: list[CachedSample], empty_caption: tuple[torch.Tensor, torch.Tensor],
               config: TrainConfig, out, *, resume: bool = False, base_model: str = "",
               log_csv=None, callback: Callable[[int, int, float], None] | None = None,
               transformer_context=None, vae_scaling_factor: float = 0.7125) -> TrainResult:
    """Train a LoRA on `samples` for `config.steps` steps and write it to `out` (kohya keys + metadata).

    `callback(step, total, loss)` runs after every step (it may raise to cancel: the steps done are saved
    first). `transformer_context` puts the transformer on its device for the run (default: the pipeline's
    placement). `empty_caption` is the (bert, t5) states of "" for caption dropout.
    """
    config.validate()
    if not samples:
        raise UnsupportedRequestError("the dataset is empty: nothing to train on")
    kinds = {s.latent_shape[1] for s in samples}
    if kinds != {pipe.transformer.config.out_channels}:
        raise UnsupportedRequestError(f"cached latents have {kinds} channels, the model expects "
                                      f"{pipe.transformer.config.out_channels}: rebuild the cache with this model")
    out = Path(out)
    dtype = torch.float32 if config.save_dtype == "float32" else torch.bfloat16
    if transformer_context is None:
        transformer_context = pipe._use("transformer") if hasattr(pipe, "_use") else nullcontext()

    order_rng = random.Random(config.seed)
    draw = torch.Generator().manual_seed(config.seed + 1)       # VAE samples, caption dropout, InP flag
    noise_rng = torch.Generator().manual_seed(config.seed)      # noise then timestep, as the original
    losses: list[float] = []
    initial = None
    if resume:
        state_file = state_path(out)
        if not out.is_file() or not state_file.is_file():
            raise UnsupportedRequestError(f"cannot resume: {out} and {state_file} must both exist (written by "
                                          "an earlier run with the same output)")
        from ..safetensors_io import load_file

        initial = load_file(out)
        state = torch.load(state_file, map_location="cpu", weights_only=False)
        if state["config"]["rank"] != config.rank or state["config"]["targets"] != config.targets:
            raise UnsupportedRequestError(f"cannot resume {out}: it was trained with rank {state['config']['rank']} "
                                          f"and targets {state['config']['targets']!r}")

    with transformer_context:
        trainer = LoraTrainer(pipe, config.rank, config.alpha, config.lr, initial, targets=config.targets,
                              warmup_steps=config.warmup_steps, seed=config.seed,
                              gradient_checkpointing=config.gradient_checkpointing)
        order: list[int] = []
        if resume:
            trainer.load_training_state(state["trainer"])
            order_rng.setstate(state["order_rng"])
            draw.set_state(state["draw"])
            noise_rng.set_state(state["noise_rng"])
            order, losses = state["order"], state["losses"]
        saved_step = trainer.global_step

        def save() -> None:
            nonlocal saved_step
            trainer.save(out, _metadata(config, trainer.global_step, samples, base_model), dtype)
            torch_save_atomic(state_path(out), {
                "trainer": trainer.training_state(), "order_rng": order_rng.getstate(), "draw": draw.get_state(),
                "noise_rng": noise_rng.get_state(), "order": order, "losses": losses, "config": asdict(config)})
            saved_step = trainer.global_step

        log = _CsvLog(log_csv, append=resume)
        try:
            while trainer.global_step < config.steps:
                if not order:
                    order = _schedule(samples, order_rng)
                sample = samples[order[0]]
                started = time.perf_counter()
                batch = _draw_batch(sample, pipe, empty_caption, config, draw, noise_rng, vae_scaling_factor)
                loss = trainer.step(*batch)
                order.pop(0)
                losses.append(loss)
                log.write(trainer.global_step, loss, trainer.optimizer.param_groups[0]["lr"], trainer.last_grad_norm,
                          time.perf_counter() - started)
                if config.save_every and trainer.global_step % config.save_every == 0:
                    save()
                if callback is not None:
                    callback(trainer.global_step, config.steps, loss)
        except NonFiniteLossError:
            log.close()
            raise
        except BaseException:
            log.close()
            if trainer.global_step > saved_step:
                save()  # Cancel / Ctrl-C / an error: keep what was trained
            raise
        log.close()
        if trainer.global_step > saved_step or not out.is_file():
            save()
    return TrainResult(out, trainer.global_step, losses)


class _CsvLog:
    """step,loss,lr,grad_norm,seconds — one line per step, flushed as it goes."""

    def __init__(self, path, append: bool):
        self.file = None
        if path is not None:
            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            new = not (append and path.is_file())
            self.file = open(path, "w" if new else "a", newline="", encoding="utf-8")
            self.writer = csv.writer(self.file)
            if new:
                self.writer.writerow(["step", "loss", "lr", "grad_norm", "seconds"])

    def write(self, step, loss, lr, grad_norm, seconds) -> None:
        if self.file is not None:
            self.writer.writerow([step, f"{loss:.6g}", f"{lr:.6g}", f"{grad_norm:.6g}", f"{seconds:.3f}"])
            self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


def train_full(pipe, samples: list[CachedSample], empty_caption, config: TrainConfig, out_dir, *,
               callback: Callable[[int, int, float], None] | None = None, vae_scaling_factor: float = 0.7125,
               log_csv=None) -> TrainResult:
    """Fine-tune every transformer weight (small models: test models) and write a complete model folder.

    `out_dir` gets the source model folder's other components (copied) and the trained transformer.
    Seeds, sampling order and the objective are those of train_lora; rank/alpha/targets are unused.
    """
    import shutil

    from .trainer import FullTrainer

    config.validate()
    if getattr(pipe, "model_dir", None) is None:
        raise UnsupportedRequestError("full fine-tuning writes a model folder and needs the source folder "
                                      "(a pipeline from load_pipeline)")
    out_dir = Path(out_dir)
    if out_dir.resolve() == Path(pipe.model_dir).resolve():
        raise UnsupportedRequestError("--out must be a new folder, not the source model folder")
    order_rng = random.Random(config.seed)
    draw = torch.Generator().manual_seed(config.seed + 1)
    noise_rng = torch.Generator().manual_seed(config.seed)
    losses: list[float] = []
    with torch.inference_mode(False), pipe._use("transformer"):
        trainer = FullTrainer(pipe, config.lr, warmup_steps=config.warmup_steps,
                              gradient_checkpointing=config.gradient_checkpointing)
        log = _CsvLog(log_csv, append=False)
        order: list[int] = []
        try:
            while trainer.global_step < config.steps:
                if not order:
                    order = _schedule(samples, order_rng)
                started = time.perf_counter()
                loss = trainer.step(*_draw_batch(samples[order.pop(0)], pipe, empty_caption, config, draw,
                                                 noise_rng, vae_scaling_factor))
                losses.append(loss)
                log.write(trainer.global_step, loss, trainer.optimizer.param_groups[0]["lr"], trainer.last_grad_norm,
                          time.perf_counter() - started)
                if callback is not None:
                    callback(trainer.global_step, config.steps, loss)
        finally:
            log.close()
        source = Path(pipe.model_dir)
        for item in source.iterdir():
            target = out_dir / item.name
            if item.name == "transformer":
                target.mkdir(parents=True, exist_ok=True)
                shutil.copy2(item / "config.json", target / "config.json")
            elif item.is_dir():
                shutil.copytree(item, target, dirs_exist_ok=True)
            else:
                out_dir.mkdir(parents=True, exist_ok=True)
                shutil.copy2(item, target)
        path = trainer.save(out_dir / "transformer" / "diffusion_pytorch_model.safetensors",
                            {"ss_steps": str(trainer.global_step), "ss_base_model": source.name})
        trainer.finish()
    return TrainResult(path, trainer.global_step, losses)
