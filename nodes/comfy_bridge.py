"""Where the pack meets ComfyUI's services: devices, the memory manager, progress bars, previews, Cancel."""
from __future__ import annotations

import logging
import time
from contextlib import contextmanager

import torch
from torch import nn

import comfy.model_management as mm
import comfy.model_patcher
import comfy.utils

log = logging.getLogger("EasyAnimate")

_OFFLOAD_DEVICES = {
    "diffusion": mm.unet_offload_device,
    "text": mm.text_encoder_offload_device,
    "vae": mm.vae_offload_device,
}
PREVIEW_EVERY_FRACTION = 8   # at most about this many previews per run
PREVIEW_TIME_BUDGET = 0.1    # previews after the first may take at most this fraction of the sampling time
PREVIEW_MAX_LATENT_SIDE = 32  # previews are decoded from at most 32 latent pixels (256 px) on the long side


def compute_device() -> torch.device:
    """ComfyUI's compute device (the CPU under --cpu)."""
    return mm.get_torch_device()


def offload_device(role: str) -> torch.device:
    return _OFFLOAD_DEVICES[role]()


class _Holder(nn.Module):
    """A plain container, so ModelPatcher can set its bookkeeping attributes without touching our modules."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.inner = module


# Named per role because ComfyUI's log says "Requested to load <class name>".
_HOLDERS = {role: type(f"EasyAnimate{label}", (_Holder,), {})
            for role, label in (("diffusion", "Transformer"), ("text", "TextEncoders"), ("vae", "VAE"))}


class ManagedModule:
    """One model component under ComfyUI's memory manager.

    `load()` lets the manager free memory (unloading other models) and moves the component to the
    compute device; `offload()` hands it back to the offload device, so ComfyUI can always free it.
    """

    def __init__(self, module: nn.Module, role: str, keep_loaded: bool = False):
        self.module = module
        self.role = role
        self.keep_loaded = keep_loaded  # memory mode "gpu": stays loaded after use (the manager may still free it)
        self.patcher = comfy.model_patcher.ModelPatcher(
            _HOLDERS[role](module), load_device=compute_device(), offload_device=offload_device(role))

    @property
    def device(self) -> torch.device:
        return self.patcher.load_device

    def load(self, *others: "ManagedModule"):
        """Move this component (and `others`) to the compute device through the manager."""
        mm.load_models_gpu([self.patcher, *(o.patcher for o in others)], force_full_load=True)
        return self.module

    @contextmanager
    def in_use(self):
        """Loaded for the `with` block, released afterwards (also on errors and Cancel)."""
        self.load()
        try:
            yield self.module
        finally:
            self.release()

    def release(self) -> None:
        """After a stage: offload, unless the memory mode keeps components loaded."""
        if not self.keep_loaded:
            self.offload()

    def offload(self) -> None:
        """Give the memory back: unload through the manager, then empty the allocator's cache."""
        for i, loaded in enumerate(mm.current_loaded_models):
            model = loaded.model
            if model is self.patcher or (model is not None and model.is_clone(self.patcher)):  # samplers load clones
                mm.current_loaded_models.pop(i).model_unload()
                break
        else:
            self.module.to(self.patcher.offload_device)
        mm.soft_empty_cache()


def check_interrupted() -> None:
    """Raise ComfyUI's interrupt exception when the user pressed Cancel."""
    mm.throw_exception_if_processing_interrupted()


def previews_enabled() -> bool:
    from comfy.cli_args import LatentPreviewMethod, args

    return args.preview_method != LatentPreviewMethod.NoPreviews


class SamplingProgress:
    """Per-step progress callback for the core pipeline: progress bar, Cancel check, preview frames.

    The preview is the first frame of the sampler's x0 estimate, decoded from a downsampled latent
    by the model's own VAE every few steps, as long as previews stay within PREVIEW_TIME_BUDGET of the
    time spent sampling (on a GPU a preview costs a fraction of a step; on a CPU it may cost more).
    """

    def __init__(self, total: int, decode_preview=None):
        self.bar = comfy.utils.ProgressBar(total)
        self.decode_preview = decode_preview if previews_enabled() else None
        self.every = max(1, total // PREVIEW_EVERY_FRACTION)
        self.started = time.perf_counter()
        self.preview_seconds = 0.0

    def __call__(self, info) -> None:
        check_interrupted()
        preview = None
        if self._wants_preview(info.step):
            began = time.perf_counter()
            source = info.denoised if info.denoised is not None else info.latents
            preview = ("JPEG", self._preview_image(source), 512)
            self.preview_seconds += time.perf_counter() - began
        self.bar.update_absolute(info.step, info.total, preview)

    def _wants_preview(self, step: int) -> bool:
        if self.decode_preview is None or step % self.every:
            return False
        sampling = time.perf_counter() - self.started - self.preview_seconds
        return self.preview_seconds == 0.0 or self.preview_seconds <= PREVIEW_TIME_BUDGET * sampling

    @torch.inference_mode()
    def _preview_image(self, latents: torch.Tensor):
        from PIL import Image

        first = latents[:, :, :1].float()
        factor = max(1, -(-max(first.shape[-2:]) // PREVIEW_MAX_LATENT_SIDE))
        if factor > 1:
            first = torch.nn.functional.avg_pool3d(first, (1, factor, factor), ceil_mode=True)
        frame = self.decode_preview(first)[0]
        return Image.fromarray((frame.clamp(0, 1) * 255).round().to(torch.uint8).numpy())


class DownloadProgressBar:
    """Model download progress on ComfyUI's progress bar (in bytes), with the Cancel check."""

    def __init__(self):
        self.bar = None

    def __call__(self, info) -> None:
        check_interrupted()
        if self.bar is None:
            self.bar = comfy.utils.ProgressBar(max(info.total, 1))
        self.bar.update_absolute(info.done, max(info.total, 1))


def to_output_images(frames: torch.Tensor) -> torch.Tensor:
    """Core frames → ComfyUI IMAGE: float32 0..1 on the intermediate device."""
    return frames.to(mm.intermediate_device(), torch.float32)
