"""Our socket types and the Python objects that travel through them.

The loader's three outputs are views of one loaded model folder; each component is managed by
ComfyUI's memory manager (see comfy_bridge.ManagedModule). Conditioning objects hold pixel inputs
rather than latents so the sampler encodes them with its own seed, exactly as the core does.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional

import torch
from comfy_api.latest import io

from .comfy_bridge import ManagedModule

ModelType = io.Custom("EASYANIMATE_MODEL")
TextEncodersType = io.Custom("EASYANIMATE_TEXT_ENCODERS")
VaeType = io.Custom("EASYANIMATE_VAE")
TextConditioningType = io.Custom("EASYANIMATE_TEXT")
VideoConditioningType = io.Custom("EASYANIMATE_VIDEO_CONDITIONING")


@dataclass(frozen=True)
class EasyAnimateVae:
    """The MagViT VAE of a model folder."""

    module: ManagedModule
    name: str

    @property
    def vae(self):
        return self.module.module


@dataclass(frozen=True)
class EasyAnimateTextEncoders:
    """BERT + mT5 with their tokenizers, as the core's TextEncoders."""

    module: ManagedModule
    encoders: object  # easyanimate_core.TextEncoders
    name: str


@dataclass(frozen=True)
class EasyAnimateModel:
    """The diffusion transformer plus what sampling needs to know about its folder."""

    module: ManagedModule
    name: str
    kind: str                     # t2v / inpaint / control
    scheduler_config: dict
    add_noise_in_inpaint_model: bool
    dtype: torch.dtype
    vae: EasyAnimateVae           # the folder's own VAE, for previews and video-to-video
    loras: tuple = ()             # ((path, strength), ...) applied at sampling time
    folder: Path | None = None    # the model folder it was loaded from (e.g. its step_cache.json)

    @property
    def transformer(self):
        return self.module.module

    def with_lora(self, path: str, strength: float) -> "EasyAnimateModel":
        return replace(self, loras=self.loras + ((path, float(strength)),))


@dataclass(frozen=True)
class TextConditioning:
    """One encoded prompt (float32 on CPU)."""

    embeds: object  # easyanimate_core.PromptEmbeds
    prompt: str


@dataclass(frozen=True)
class VideoConditioning:
    """Pixel inputs for an InP or Control model, encoded by the sampler with `vae`."""

    vae: EasyAnimateVae
    start_image: Optional[torch.Tensor] = None
    end_image: Optional[torch.Tensor] = None
    video: Optional[torch.Tensor] = None
    mask: Optional[torch.Tensor] = None
    control_video: Optional[torch.Tensor] = None
    notes: tuple = field(default=())

    def describe(self) -> str:
        parts = [name for name in ("start_image", "end_image", "video", "mask", "control_video")
                 if getattr(self, name) is not None]
        return ", ".join(parts) or "nothing"
