"""LoRA (and full) training for EasyAnimate V5, the original trainer's objective. No ComfyUI imports.

    from easyanimate_core.training import LoraTrainer
    trainer = LoraTrainer(pipe, rank=4, alpha=2.0, lr=1e-3, initial_lora=None)
    loss = trainer.step(latents, prompt_embeds, prompt_embeds_2, timesteps, noise, inpaint_latents=None)
    trainer.save("style.safetensors")

Layers: objective.py (schedule, target, loss, clipping), adapter.py (LoRA factors + hooks),
trainer.py (one step), dataset.py + cache.py (files -> cached latents/embeddings), loop.py (the
whole run: saves, resume, NaN, logs), planner.py (which memory options fit a GPU).
"""
from .adapter import LoraAdapter, TARGET_SETS
from .trainer import FullTrainer, LoraTrainer, NonFiniteLossError

__all__ = ["LoraTrainer", "FullTrainer", "LoraAdapter", "NonFiniteLossError", "TARGET_SETS"]
