"""Sliding temporal context windows: a `model_fn` for Pipeline.denoise that runs the transformer on
overlapping windows of latent frames and fuses their predictions (the approach of ComfyUI's context
windows; own code). Schedule: windows of one length overlapping by a fixed number of latent frames,
the last moved back to end at the end. Fuse: linear (a cross-fade over the shared frames) or pyramid
(highest in a window's middle).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from .buckets import VAE_TEMPORAL_COMPRESSION
from .pipeline import call_transformer
from .text import PromptEmbeds

FUSE_METHODS = ("linear", "pyramid")


def window_overlap_latents(overlap_frames: int, window: int) -> int:
    """Video-frame overlap → latent-frame overlap of context windows (4 frames a latent, at least 1)."""
    return max(1, min(window - 1, math.ceil(overlap_frames / VAE_TEMPORAL_COMPRESSION)))


def plan_windows(latent_count: int, window: int, overlap: int) -> list[tuple[int, int]]:
    """Windows of `window` latent frames, `window − overlap` apart; the last is moved back to end at the end."""
    if latent_count <= window:
        return [(0, latent_count)]
    stride = window - overlap
    windows = []
    for start in range(0, latent_count, stride):
        if start + window >= latent_count:
            windows.append((latent_count - window, latent_count))
            break
        windows.append((start, start + window))
    return windows


def window_weights(windows: Sequence[tuple[int, int]], index: int, fuse: str) -> torch.Tensor:
    """Per-latent-frame weights of one window.

    linear: 1 inside, ramps over the frames shared with the previous/next window, built so the weights
    of two neighbours add up to 1 there (a cross-fade); pyramid: 1, 2, … up to the middle and back down.
    """
    start, stop = windows[index]
    length = stop - start
    if fuse == "pyramid":
        half = (length + 1) // 2
        return torch.tensor([min(i + 1, length - i, half) for i in range(length)], dtype=torch.float32)
    weights = torch.ones(length)
    if index > 0:
        shared = windows[index - 1][1] - start
        weights[:shared] = torch.arange(1, shared + 1) / (shared + 1)
    if index + 1 < len(windows):
        shared = stop - windows[index + 1][0]
        weights[length - shared:] = torch.arange(shared, 0, -1) / (shared + 1)
    return weights


class WindowedModel:
    """A `model_fn` for Pipeline.denoise: the transformer over temporal windows, predictions fused.

    Each window is a separate transformer call on the latent frames [start, stop) (so its RoPE time
    positions start at 0), with the inpaint/control latents sliced alike, and with that window's prompt
    when there is one per window. Overlapping predictions are averaged with the fuse weights.
    """

    def __init__(self, windows, fuse: str, window_texts=None, negative=None, on_window=None):
        self.windows = list(windows)
        self.weights = [window_weights(self.windows, i, fuse) for i in range(len(self.windows))]
        self.window_texts = window_texts
        self.negative = negative
        self.on_window = on_window
        self.passes = 0
        self._texts = None

    def __call__(self, transformer, model_in, timestep, text, inpaint, control) -> torch.Tensor:
        fused = total = None
        for i, (start, stop) in enumerate(self.windows):
            if self.on_window is not None:
                self.on_window(i, len(self.windows))
            part = slice(start, stop)
            pred = call_transformer(transformer, model_in[:, :, part], timestep, self._text(i, text),
                                    None if inpaint is None else inpaint[:, :, part],
                                    None if control is None else control[:, :, part]).float()
            self.passes += 1
            weight = self.weights[i].to(pred.device).view(1, 1, -1, 1, 1)
            if fused is None:
                fused = torch.zeros(pred.shape[:2] + model_in.shape[2:], device=pred.device)
                total = torch.zeros(1, 1, model_in.shape[2], 1, 1, device=pred.device)
            fused[:, :, part] += pred * weight
            total[:, :, part] += weight
        return fused / total

    def _text(self, index: int, text: PromptEmbeds) -> PromptEmbeds:
        if self.window_texts is None:
            return text
        if self._texts is None:  # the same device/dtype/CFG layout denoise gave `text`
            batch = text.bert.shape[0]
            self._texts = [(PromptEmbeds.cat([self.negative, t]) if batch == 2 else t).to(text.bert.device,
                                                                                          text.bert.dtype)
                           for t in self.window_texts]
        return self._texts[index]
