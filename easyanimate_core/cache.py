"""Step caching: skip transformer passes whose result barely changes, reusing the last block-stack residual.

    settings = CacheSettings.parse("teacache:0.1")          # or CacheSettings("auto", 0.2)
    result = pipe.generate("...", cache=settings)
    result.cache_stats.describe()                           # "skipped 12 of 30 transformer passes ..."

How: during one `Pipeline.denoise` a `StepCache` is installed as `transformer.blocks_runner` (and removed
in a finally block, so an error or Cancel leaves the transformer as it was) and told the step index
through the loop's `step_hook`. For each transformer pass it decides, from a cheap indicator, whether the
block stack (all the cost) must run; if not it returns input + the residual (output − input of the block
stack) of the last computed pass. The decision is one for the whole batch, so both halves of a CFG batch
are computed or skipped together. Computed passes go through `transformer.run_blocks` (or a runner that
was installed before), so LoRA hooks, fp8 layers, block swap and compiled blocks apply as usual.

Policies:
- "teacache": accumulate poly(relative L1 change of the first block's timestep-modulated input) from
  pass to pass; while the sum stays under the threshold, skip. The polynomial is per model kind/size
  (COEFFICIENTS below, or a `step_cache.json` written by `calibrate-cache` in the model folder).
- "auto" (calibration-free, after EasyCache): estimate the block stack's relative output change since
  the last computed pass as k · |Δinput| / |last output|, where k = |Δoutput| / |Δinput| measured between
  the last two computed passes; skip while the estimate stays under the threshold.
Neither ever skips before the `start` or from the `end` fraction of the steps, nor the first or last
step, nor the pass right after a computed one without a residual to reuse. Threshold 0 never skips and
is bit-identical to no cache.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .errors import UnsupportedRequestError

POLICIES = ("teacache", "auto")
COEFFICIENTS_FILE = "step_cache.json"
DEFAULT_THRESHOLDS = {"teacache": 0.15, "auto": 0.15}  # picked from benchmarks/step_cache.py (README)
DEFAULT_START, DEFAULT_END = 0.1, 0.9

# TeaCache polynomials (highest power first, numpy.polyval order) per (model kind, model size).
# Only measured ones: the original V5 releases ship none for V5-12B/7B; run `calibrate-cache` on the real
# weights to get them (it writes COEFFICIENTS_FILE into the model folder, which takes precedence).
COEFFICIENTS: dict[tuple[str, str], dict] = {}


# ---------------------------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class CacheSettings:
    """What to cache: `policy` ("teacache" or "auto"), `threshold` ≥ 0 and the [start, end) step window."""

    policy: str
    threshold: float
    start: float = DEFAULT_START
    end: float = DEFAULT_END

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise UnsupportedRequestError(
                f"unknown step-cache policy {self.policy!r}; use one of {', '.join(POLICIES)} "
                "(teacache: calibrated per model, auto: needs no calibration)")
        if not isinstance(self.threshold, (int, float)) or self.threshold != self.threshold or self.threshold < 0:
            raise UnsupportedRequestError(
                f"step-cache threshold must be a number ≥ 0 (0 = never skip), got {self.threshold!r}")
        for name in ("start", "end"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise UnsupportedRequestError(f"step-cache {name} must be a fraction of the steps in [0, 1], got {value}")
        if self.start >= self.end:
            raise UnsupportedRequestError(
                f"step-cache start ({self.start}) must be before end ({self.end}): skips may only happen in "
                "between (e.g. start 0.1, end 0.9)")

    @classmethod
    def parse(cls, text: str) -> "CacheSettings":
        """'policy:threshold[:start:end]', e.g. 'teacache:0.1' or 'auto:0.2:0.1:0.9' (CLI form)."""
        parts = str(text).strip().split(":")
        if len(parts) not in (2, 4):
            raise UnsupportedRequestError(
                f"step cache {text!r}: expected POLICY:THRESHOLD or POLICY:THRESHOLD:START:END, "
                f"e.g. teacache:0.1 or auto:0.2 (policies: {', '.join(POLICIES)})")
        try:
            numbers = [float(p) for p in parts[1:]]
        except ValueError:
            raise UnsupportedRequestError(f"step cache {text!r}: threshold/start/end must be numbers") from None
        return cls(parts[0].strip().lower(), *numbers)

    def describe(self) -> str:
        return f"{self.policy} threshold {self.threshold:g}, steps {self.start:g}–{self.end:g}"


@dataclass
class CacheStats:
    """What a step cache did during one denoise."""

    policy: str
    threshold: float
    passes: int = 0                  # block-stack passes asked for (one per step, more with context windows)
    skipped: int = 0
    skipped_steps: list = field(default_factory=list)  # 0-based step index of every skipped pass
    records: list = field(default_factory=list)        # (step, input change, output change) when recording

    @property
    def computed(self) -> int:
        return self.passes - self.skipped

    @property
    def skipped_fraction(self) -> float:
        return self.skipped / self.passes if self.passes else 0.0

    def describe(self) -> str:
        return (f"skipped {self.skipped} of {self.passes} transformer passes "
                f"({self.skipped_fraction:.0%}, {self.policy} threshold {self.threshold:g})")


# ---------------------------------------------------------------------------------------------- model identity
def model_size(config) -> str:
    """A name for the transformer's size: 'V5-12B', 'V5-7B', or its shape, e.g. '4 layers x 64 (4 MMDiT)'."""
    shape = (config.num_layers, config.mmdit_layers, config.inner_dim)
    known = {(48, 48, 3072): "V5-12B", (48, 24, 3072): "V5-7B"}
    return known.get(shape, f"{shape[0]} layers x {shape[2]} ({shape[1]} MMDiT)")


def model_kind(config) -> str:
    from .loading import KIND_BY_IN_CHANNELS

    return KIND_BY_IN_CHANNELS.get(config.in_channels, f"in_channels {config.in_channels}")


def load_coefficients(transformer, model_dir=None) -> list[float]:
    """The TeaCache polynomial for this transformer: the model folder's step_cache.json, else the table.

    A file made for another model kind/size is refused, naming what it was made for.
    """
    kind, size = model_kind(transformer.config), model_size(transformer.config)
    if model_dir is not None:
        path = Path(model_dir) / COEFFICIENTS_FILE
        if path.is_file():
            return read_coefficients_file(path, kind, size)
    entry = COEFFICIENTS.get((kind, size))
    if entry is None:
        raise UnsupportedRequestError(
            f"no TeaCache coefficients for this model ({kind}, {size}): measure them once with "
            f"`python -m easyanimate_core calibrate-cache --model <model folder>` (writes {COEFFICIENTS_FILE} "
            "there), or use the calibration-free policy 'auto'")
    return list(entry["coefficients"])


def read_coefficients_file(path: Path, kind: str, size: str) -> list[float]:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        made_for = (data["model"]["kind"], data["model"]["size"])
        coefficients = [float(c) for c in data["teacache"]["coefficients"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UnsupportedRequestError(
            f"{path} is not a step-cache coefficients file ({exc}); delete it or run calibrate-cache again") from exc
    if made_for != (kind, size):
        raise UnsupportedRequestError(
            f"{path} was calibrated for a {made_for[0]} model of size {made_for[1]}, but this model is {kind}, "
            f"{size}: run `python -m easyanimate_core calibrate-cache --model {Path(path).parent}` for this model")
    if not coefficients:
        raise UnsupportedRequestError(f"{path} holds no coefficients; run calibrate-cache again")
    return coefficients


def polyval(coefficients: list[float], x: float) -> float:
    result = 0.0
    for c in coefficients:
        result = result * x + c
    return result


def relative_l1(new: torch.Tensor, old: torch.Tensor) -> float:
    """mean|new − old| / mean|old|, over the whole (CFG) batch, in float32."""
    old = old.float()
    return float((new.float() - old).abs().mean() / old.abs().mean().clamp_min(1e-12))


# ---------------------------------------------------------------------------------------------- the cache
Runner = Callable[..., torch.Tensor]


class _Slot:
    """State of one pass position within a step (one per context window; just one without windows)."""

    def __init__(self):
        self.residual: Optional[torch.Tensor] = None
        self.last_input: Optional[torch.Tensor] = None      # block-stack input of the last computed pass
        self.last_output: Optional[torch.Tensor] = None
        self.indicator: Optional[torch.Tensor] = None       # teacache: previous pass's modulated input
        self.accumulated = 0.0
        self.rate: Optional[float] = None                   # auto: |Δoutput| / |Δinput| between the last two computes


class StepCache:
    """One denoise's step cache: install with `installed(transformer)`, feed `step_hook(i, total)`."""

    def __init__(self, settings: CacheSettings, coefficients: Optional[list[float]] = None, record: bool = False):
        if settings.policy == "teacache" and coefficients is None and not record:
            raise UnsupportedRequestError("the teacache policy needs coefficients (see load_coefficients)")
        self.settings = settings
        self.coefficients = coefficients
        self.record = record  # calibration: never skip, record (input change, output change) per pass
        self.stats = CacheStats(settings.policy, settings.threshold)
        self._slots: list[_Slot] = []
        self._step, self._total, self._call = 0, 1, 0
        self._inner: Optional[Runner] = None
        self._modulation = None

    # -------------------------------------------------------------- plumbing
    def step_hook(self, index: int, total: int) -> None:
        self._step, self._total, self._call = index, total, 0

    def installed(self, transformer):
        """Context manager: this cache is the transformer's blocks_runner inside, the previous one after."""
        return _Installed(self, transformer)

    def _may_skip(self) -> bool:
        i, total = self._step, self._total
        if self.record or self.settings.threshold <= 0 or i == 0 or i >= total - 1:
            return False
        return self.settings.start * total <= i < self.settings.end * total

    def _compute(self, transformer, x, ctx, temb, rope) -> torch.Tensor:
        if self._inner is not None:
            return self._inner(transformer, x, ctx, temb, rope)
        return transformer.run_blocks(x, ctx, temb, rope)

    # -------------------------------------------------------------- the runner
    def __call__(self, transformer, x, ctx, temb, rope) -> torch.Tensor:
        if self._call >= len(self._slots):
            self._slots.append(_Slot())
        slot = self._slots[self._call]
        self._call += 1
        self.stats.passes += 1
        usable = slot.residual is not None and slot.residual.shape == x.shape
        if not usable:
            slot.__init__()

        indicator_change = None
        if self.settings.policy == "teacache" or self.record:
            indicator = self._modulated_input(transformer, x, ctx, temb)
            if slot.indicator is not None and slot.indicator.shape == indicator.shape:
                indicator_change = relative_l1(indicator, slot.indicator)
                if self.coefficients is not None:
                    slot.accumulated += abs(polyval(self.coefficients, indicator_change))
            slot.indicator = indicator

        if usable and self._may_skip():
            if self.settings.policy == "teacache":
                skip = slot.accumulated < self.settings.threshold
            else:
                skip = self._auto_estimate(slot, x) < self.settings.threshold
            if skip:
                self.stats.skipped += 1
                self.stats.skipped_steps.append(self._step)
                return x + slot.residual

        out = self._compute(transformer, x, ctx, temb, rope)
        if self.record and indicator_change is not None and slot.last_output is not None:
            self.stats.records.append((self._step, indicator_change, relative_l1(out, slot.last_output)))
        if self.settings.policy == "auto":
            if slot.last_input is not None:
                input_change = float((x - slot.last_input).float().abs().mean())
                if input_change > 0:
                    slot.rate = float((out - slot.last_output).float().abs().mean()) / input_change
            slot.last_input = x
        if self.settings.policy == "auto" or self.record:
            slot.last_output = out
        slot.residual = out - x
        slot.accumulated = 0.0
        return out

    def _auto_estimate(self, slot: _Slot, x: torch.Tensor) -> float:
        """Estimated relative change of the block-stack output since the last computed pass (inf: unknown)."""
        if slot.rate is None:
            return float("inf")
        input_change = float((x - slot.last_input).float().abs().mean())
        return slot.rate * input_change / max(float(slot.last_output.abs().mean()), 1e-12)

    def _modulated_input(self, transformer, x, ctx, temb) -> torch.Tensor:
        """The first block's timestep-modulated video input, LN(x)·(1 + scale) + shift (cheap: no attention)."""
        if self._modulation is None:
            self._modulation = _first_block_modulation(transformer, x.device)
        norm1 = self._modulation  # LayerNormZero; only its video half is needed (the text half costs more here)
        shift, scale = norm1.linear(F.silu(temb))[:, None, :].chunk(6, dim=-1)[:2]
        return torch.addcmul(shift, norm1.norm(x), 1 + scale)


class _Installed:
    def __init__(self, cache: StepCache, transformer):
        self.cache, self.transformer = cache, transformer

    def __enter__(self):
        self.previous = self.transformer.blocks_runner
        self.cache._inner = self.previous
        self.transformer.blocks_runner = self.cache
        return self.cache

    def __exit__(self, *exc):
        self.transformer.blocks_runner = self.previous
        self.cache._inner = None
        self.cache._slots.clear()  # drop the cached residuals (device memory)
        self.cache._modulation = None
        return False


def _first_block_modulation(transformer, device):
    """Block 0's norm1, callable now: the block itself, or a device copy when block swap holds its weights."""
    from .block_swap import get_block_swap, suspended

    norm1 = transformer.transformer_blocks[0].norm1
    swap = get_block_swap(transformer)
    if swap is None or 0 not in swap.indices:
        return norm1
    import copy

    with suspended(transformer):  # the real tensors, for the duration of the copy
        return copy.deepcopy(norm1).to(device)


def make_step_cache(settings: Optional[CacheSettings], transformer, model_dir=None) -> Optional[StepCache]:
    """The StepCache for one denoise (None for no cache); teacache reads this model's coefficients."""
    if settings is None:
        return None
    if not hasattr(transformer, "run_blocks"):  # e.g. the multi-GPU workers' stand-in: the blocks run elsewhere
        raise UnsupportedRequestError(
            "step caching runs inside the transformer's block stack, which this model runs in other processes "
            "(multi-GPU workers): disconnect the cache, or load the model with the single-GPU Model Loader")
    coefficients = load_coefficients(transformer, model_dir) if settings.policy == "teacache" else None
    return StepCache(settings, coefficients)
