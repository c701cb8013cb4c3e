"""A Pipeline whose stages run together on every rank of a torch.distributed world.

Every stage is collective: all ranks call `generate` (or the same stages in the same order) with the
same arguments. Rank 0, the driver, holds the text encoders and the VAE; it encodes the prompts,
prepares the conditioning and decodes, and sends the prompt embeddings and the conditioning to the
other ranks, which load only the transformer. The denoising loop runs on every rank, its transformer
calls split by CFG half (cfg.py) and by sequence (ulysses.py); all ranks end each step with the same
latents. The VAE decode stays on rank 0 (see README "Several GPUs" for why).
"""
from __future__ import annotations

import io
from typing import Callable, Optional

import torch
import torch.distributed as dist

from ..pipeline import Conditioning, Pipeline, StepInfo
from ..text import PromptEmbeds
from .groups import ParallelGroups
from .spec import ParallelError
from .split import split_transformer


class ParallelPipeline(Pipeline):
    """Pipeline over `groups` (groups.make_groups); `vae` and `text_encoders` are None except on rank 0."""

    def __init__(self, *, groups: ParallelGroups, **kwargs):
        super().__init__(**kwargs)
        self.groups = groups

    @property
    def is_driver(self) -> bool:
        return self.groups.is_driver

    def set_vae_tiling(self, enabled: bool, tile_sample_min_size: int = 384, tile_overlap_factor: float = 0.25):
        if self.vae is not None:
            super().set_vae_tiling(enabled, tile_sample_min_size, tile_overlap_factor)

    # ------------------------------------------------------------------ stages, collective
    def encode_prompt(self, prompt: str) -> PromptEmbeds:
        embeds = super().encode_prompt(prompt) if self.is_driver else None
        return self._from_driver(embeds)

    def prepare(self, **kwargs) -> Conditioning:
        """The driver's Pipeline.prepare(**kwargs), sent to every rank (same noise, scheduler and generator state)."""
        conditioning = super().prepare(**kwargs) if self.is_driver else None
        return self._from_driver(conditioning)

    @torch.inference_mode()
    def denoise(self, conditioning: Conditioning, positive: PromptEmbeds, negative: Optional[PromptEmbeds] = None,
                guidance_scale: float = 6.0, callback: Optional[Callable[[StepInfo], None]] = None, *,
                model_fn=None, step_hook=None, cache=None) -> torch.Tensor:
        """Pipeline.denoise split over the ranks; a callback that raises on any rank stops every rank after
        that step (the others raise ParallelError), so no rank is left waiting in a collective.

        A step cache works with the Ulysses split (every rank of a group sees the same full input, so all
        decide alike) but not with the CFG split: each half would decide on its own half of the batch."""
        if cache is not None and self.groups.cfg_group is not None:
            raise ParallelError("a step cache cannot be combined with cfg-parallel sampling yet (each half would "
                                "skip on its own): use a ulysses-only layout, or sample without the cache")
        with split_transformer(self.transformer, self.groups, model_fn) as split_fn:
            return super().denoise(conditioning, positive, negative, guidance_scale, self._agreed(callback),
                                   model_fn=split_fn, step_hook=step_hook, cache=cache)

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor):
        """Frames on rank 0; None on the other ranks (they hold no VAE)."""
        return super().decode(latents) if self.is_driver else None

    # ------------------------------------------------------------------ helpers
    def _from_driver(self, obj):
        """`obj` of rank 0 on every rank, its tensors on this rank's device (CPU ones stay on the CPU)."""
        generator_state = None
        if isinstance(obj, Conditioning) and obj.generator is not None:
            generator_state = obj.generator.get_state()
            obj_to_send = Conditioning(**{**obj.__dict__, "generator": None})
        else:
            obj_to_send = obj
        payload = [None, generator_state]
        if self.is_driver:
            buffer = io.BytesIO()
            torch.save(obj_to_send, buffer)
            payload[0] = buffer.getvalue()
        dist.broadcast_object_list(payload, src=0)
        if self.is_driver:
            return obj
        received = torch.load(io.BytesIO(payload[0]), map_location=_remap(self.device), weights_only=False)
        if payload[1] is not None:
            received.generator = torch.Generator("cpu")
            received.generator.set_state(payload[1])
        return received

    def _agreed(self, callback):
        """Wrap `callback` so that all ranks learn after each step whether one of them stopped."""
        device = self.device if self.groups.backend == "nccl" else torch.device("cpu")

        def step_done(info: StepInfo):
            error = None
            if callback is not None:
                try:
                    callback(info)
                except BaseException as exc:  # noqa: BLE001 - re-raised below, after telling the others
                    error = exc
            flag = torch.tensor([0 if error is None else self.groups.rank + 1], device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            if error is not None:
                raise error
            if int(flag.item()):
                raise ParallelError(f"rank {int(flag.item()) - 1} stopped after step {info.step}/{info.total}; "
                                    "this rank stops too")

        return step_done


def _remap(device: torch.device):
    """map_location keeping CPU tensors on the CPU and putting device tensors on this rank's device."""
    def location(storage, where: str):
        if where == "cpu" or device.type == "cpu":
            return storage
        return torch.serialization.default_restore_location(storage, str(device))

    return location
