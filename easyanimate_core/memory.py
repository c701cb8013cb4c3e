"""Memory modes: where the components live, what is stored in fp8, how many blocks are swapped.

Modes (`load_pipeline(..., memory=...)`, `python -m easyanimate_core generate --memory ...`):

  gpu             everything resident on the device (the default; fastest)
  offload         each component on the device only while it is used: the text encoders while
                  encoding, the transformer while denoising, the VAE while encoding/decoding; on the
                  CPU otherwise (the original's "model CPU offload")
  fp8             fp8 transformer weights (fp8.py) + offload
  block_swap      offload + the last N transformer blocks streamed from pinned CPU memory (block_swap.py)
  fp8_block_swap  fp8 + offload + block swap
  auto            the first of gpu, offload, fp8, fp8_block_swap (smallest N) that fits the free
                  device memory, from the sizes below; on the CPU, everything stays resident

`plan_memory` is a pure function of byte counts (testable with made-up numbers); `estimate_working_bytes`
gives the working memory of each stage for a video size; `model_sizes` reads the component sizes from a
model folder's headers and configs without loading weights. Placements (`ResidentPlacement`,
`OffloadPlacement`) are what Pipeline stages use to get a component onto the device.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .errors import UnsupportedRequestError

if TYPE_CHECKING:
    from .models.transformer import TransformerConfig

MEMORY_MODES = ("auto", "gpu", "offload", "fp8", "block_swap", "fp8_block_swap")
DEFAULT_PLAN_SIZE = (384, 672, 49)  # height, width, frames the auto plan assumes when not told
GB = 1e9
GiB = 1 << 30

# Working memory coefficients, measured (see estimate_working_bytes). Units:
#   transformer: U = batch × (video tokens + text tokens) × hidden × bytes per activation element
#   VAE:         P = first VAE channel count (128) × 4 frames per chunk × height × width × bytes per element
TRANSFORMER_WORKING_PER_U = 13.0   # measured 11.6-11.8 (live tensors of one forward, see below)
VAE_DECODE_WORKING_PER_P = 18.0    # measured 17.5
VAE_ENCODE_WORKING_PER_P = 11.5    # measured 11.1
TEXT_WORKING_BYTES = 256 << 20     # one prompt, 77 + 256 tokens: a few MB of activations, rounded up
TEXT_TOKENS = 77 + 256


def check_mode(mode: str) -> None:
    """Refuse a name that is not one of MEMORY_MODES."""
    if mode not in MEMORY_MODES:
        raise UnsupportedRequestError(f"unknown memory mode {mode!r}; choose one of {', '.join(MEMORY_MODES)}")


def requested_mode(mode: str, swap_blocks: int | None) -> str:
    """The mode a front end asks for: a swap count given with "auto" means "block_swap" (the CLI's
    --swap-blocks and the loader node's swap_blocks); plan_memory itself refuses that pair."""
    return "block_swap" if swap_blocks and mode == "auto" else mode


# ------------------------------------------------------------------------------------------ estimates
def estimate_working_bytes(height: int, width: int, num_frames: int, *, guidance: bool = True,
                           dtype: torch.dtype = torch.bfloat16, hidden: int = 3072, patch_size: int = 2,
                           vae_channels: int = 128, vae_dtype: torch.dtype | None = None,
                           largest_linear: int = 3072 * 12288, vae_tile: int = 384) -> dict[str, int]:
    """Working (activation) memory of each stage for one video, in bytes: keys "transformer", "vae",
    "vae_tiled" (with spatial VAE tiling at `vae_tile` pixels) and "text". Defaults: the 12B model.

    How the formulas were derived: the peak bytes of live tensors created during one call were
    counted on the CPU (a TorchDispatchMode recording every op's output storage and freeing it when
    the last tensor using it dies) for scaled-down models with the real structure, then expressed in
    the units below; the ratio was constant across widths, token counts and dtypes (±2 %).

    transformer: ≈ 11.8 U for one forward of the current transformer.py (it was 16.4 before the
                 in-place inference paths), where U = batch × (T·h/2·w/2 + 333) × hidden × element
                 bytes (batch 2 with guidance; the 333 text tokens are 77 BERT + 256 mT5). The peak
                 is in the feed-forward of a block, with the block's q/k/v still alive. Rounded up to
                 13 U for the allocator's fragmentation and kernel workspaces; plus one transient
                 copy of the largest Linear weight in the compute dtype (fp8 layers dequantise per call).
    vae decode:  ≈ 17.5 P, P = 128 channels × 4 frames × H × W × element bytes: the decoder streams one
                 latent frame (4 video frames) at a time, so it does not grow with the frame count;
                 its peak is in the full-resolution up block. Rounded to 18 P; plus twice the decoded
                 video in the VAE dtype (the per-chunk outputs and their concatenation; vae_io moves
                 it to the host before converting to float32 0..1 frames).
    vae encode:  ≈ 11.1 P (chunks of 4 frames), rounded to 11.5 P, plus the input video.
    vae_tiled:   the decode formula for one tile (H, W capped at `vae_tile`) plus the full output.
    text:        a constant (one prompt is a few MB of activations).
    """
    e = torch.empty((), dtype=dtype).element_size()
    ve = torch.empty((), dtype=vae_dtype or dtype).element_size()
    latent_frames = (int(num_frames) - 1) // 4 + 1
    video_tokens = latent_frames * (int(height) // (8 * patch_size)) * (int(width) // (8 * patch_size))
    batch = 2 if guidance else 1
    unit = batch * (video_tokens + TEXT_TOKENS) * hidden * e
    transformer = int(TRANSFORMER_WORKING_PER_U * unit) + largest_linear * e

    pixels = int(height) * int(width)
    video_values = 3 * int(num_frames) * pixels
    output = 2 * video_values * ve

    def decode(px: int) -> int:
        return int(VAE_DECODE_WORKING_PER_P * vae_channels * 4 * px * ve)

    tile_px = min(int(height), vae_tile) * min(int(width), vae_tile)
    vae = max(decode(pixels) + output, int(VAE_ENCODE_WORKING_PER_P * vae_channels * 4 * pixels * ve) + output // 2)
    return {"transformer": transformer, "vae": vae, "vae_tiled": decode(tile_px) + output,
            "text": TEXT_WORKING_BYTES}


@dataclass(frozen=True)
class ModelSizes:
    """Byte sizes of a model's components as they will be stored (from shapes; nothing loaded)."""

    transformer: int
    transformer_fp8: int
    blocks: tuple[int, ...]       # per transformer block, compute dtype
    blocks_fp8: tuple[int, ...]   # per transformer block, fp8 storage
    text: int
    vae: int

    @property
    def component_bytes(self) -> dict[str, int]:
        return {"transformer": self.transformer, "transformer_fp8": self.transformer_fp8, "text": self.text,
                "vae": self.vae}


def transformer_sizes(config: dict | TransformerConfig, dtype: torch.dtype, fp8: bool = False
                      ) -> tuple[int, tuple[int, ...]]:
    """(total bytes, bytes per block) of a V5 transformer in `dtype` (or with fp8 block Linears), from shapes."""
    from .fp8 import quantize_to_fp8, weight_bytes
    from .models.transformer import EasyAnimateTransformer3D, TransformerConfig

    cfg = config if isinstance(config, TransformerConfig) else TransformerConfig.from_dict(config)
    with torch.device("meta"):
        model = EasyAnimateTransformer3D(cfg).to(dtype)
    if fp8:
        quantize_to_fp8(model, dtype)
    return weight_bytes(model), tuple(weight_bytes(b) for b in model.transformer_blocks)


def model_sizes(files, dtype: torch.dtype) -> ModelSizes:
    """Component sizes of a validated model folder (loading.ModelFiles) in the dtypes load_pipeline uses."""
    from .safetensors_io import read_index

    def stored(paths, as_dtype) -> int:
        size = torch.empty((), dtype=as_dtype).element_size()
        return sum(math.prod(e.shape) * (size if e.dtype.is_floating_point else e.dtype.itemsize)
                   for p in paths for e in read_index(p).entries.values())

    text_dtype = torch.bfloat16 if dtype == torch.float16 else dtype
    vae_dtype = torch.float32 if dtype == torch.float16 else dtype
    total, blocks = transformer_sizes(files.transformer_config, dtype)
    total8, blocks8 = transformer_sizes(files.transformer_config, dtype, fp8=True) if _fp8_ok() else (total, blocks)
    return ModelSizes(transformer=total, transformer_fp8=total8, blocks=blocks, blocks_fp8=blocks8,
                      text=stored(files.text_encoder_weights, text_dtype) + stored(files.text_encoder_2_weights, text_dtype),
                      vae=stored(files.vae_weights, vae_dtype))


def _fp8_ok() -> bool:
    from .fp8 import fp8_available

    return fp8_available()


# ------------------------------------------------------------------------------------------ the plan
@dataclass(frozen=True)
class MemoryPlan:
    """What load_pipeline does with memory; `describe()` is the line loaders print."""

    mode: str                  # resolved mode: gpu, offload, fp8, block_swap or fp8_block_swap (never auto)
    offload: bool              # components on the device only while used
    fp8: bool                  # fp8 transformer block weights
    swap_blocks: int           # transformer blocks streamed from CPU memory (the last N)
    reason: str
    requested: str = ""        # the mode asked for ("auto" or the mode itself)
    num_blocks: int | None = None    # the transformer's block count, when known
    peak_bytes: int | None = None    # estimated peak device memory
    budget_bytes: int | None = None  # usable device memory: free minus a reserve
    vae_tiling: bool = False   # spatial VAE tiling needed for the VAE to fit

    @property
    def fits(self) -> bool | None:
        if self.peak_bytes is None or self.budget_bytes is None:
            return None
        return self.peak_bytes <= self.budget_bytes

    def label(self) -> str:
        """What the mode does, e.g. "fp8 + offload + 20 of 48 blocks swapped"."""
        parts = ["everything resident"] if not self.offload else ["offload"]
        if self.fp8:
            parts.insert(0, "fp8")
        if self.swap_blocks:
            of = f" of {self.num_blocks}" if self.num_blocks else ""
            parts.append(f"{self.swap_blocks}{of} blocks swapped")
        if self.vae_tiling:
            parts.append("VAE tiling")
        return " + ".join(parts)

    def describe(self) -> str:
        """One line: the mode, why, and the estimate it rests on."""
        how = "auto" if self.requested == "auto" else "requested"
        line = f"memory: {self.label()} [{self.mode}, {how}]: {self.reason}"
        if self.peak_bytes is not None and self.budget_bytes is not None:
            line += f"; estimated peak {_gb(self.peak_bytes)} of {_gb(self.budget_bytes)} usable"
            if not self.fits:
                line += ": it may run out of memory"
        return line


def _gb(n: float) -> str:
    return f"{n / GB:.1f} GB"


def default_reserve(total_bytes: int) -> int:
    """Device memory kept free for the CUDA context's growth, allocator fragmentation, kernel workspaces."""
    return max(GiB, int(0.05 * total_bytes))


def plan_memory(mode: str = "auto", *, free_bytes: int | None = None, total_bytes: int | None = None,
                component_bytes: Mapping[str, int] | None = None,
                transformer_block_bytes: int | Sequence[int] | None = None,
                activation_estimate_bytes: int | Mapping[str, int] | None = None,
                transformer_block_bytes_fp8: int | Sequence[int] | None = None,
                num_blocks: int | None = None, swap_blocks: int | None = None,
                reserve_bytes: int | None = None, device_type: str = "cuda") -> MemoryPlan:
    """Choose (mode "auto") or size (explicit modes) a memory plan from byte counts. Pure: no torch calls.

    free_bytes, total_bytes   the device's free and total memory (torch.cuda.mem_get_info)
    component_bytes           {"transformer", "text", "vae"} as stored, and "transformer_fp8" (fp8
                              block Linears; default: half the transformer, the bf16 → fp8 ratio)
    transformer_block_bytes   bytes of each block (a list), or of every block (an int, with num_blocks);
                              transformer_block_bytes_fp8 the same with fp8 storage (default: scaled
                              like the transformer)
    activation_estimate_bytes working memory per stage, {"transformer", "vae", "vae_tiled", "text"}
                              (estimate_working_bytes), or one number for every stage
    swap_blocks               for the block-swap modes: N, or None for the smallest N that fits
    reserve_bytes             kept free on top (default: max(1 GiB, 5 % of total))

    Stages run one after the other, so with offload the peak is the largest of text encoders + their
    working memory, VAE + its working memory, and resident transformer + its working memory; with
    everything resident it is all components + the largest working memory. A swapped transformer
    keeps its other blocks resident plus two swapped blocks materialised at a time.
    """
    check_mode(mode)
    if swap_blocks and mode not in ("block_swap", "fp8_block_swap"):
        raise UnsupportedRequestError(f"swap_blocks needs memory mode block_swap or fp8_block_swap, not {mode}")
    if device_type != "cuda" and mode == "auto":
        return MemoryPlan("gpu", False, False, 0, f"on the {device_type.upper()} everything stays resident in "
                          "system memory (nothing to plan)", requested=mode, num_blocks=num_blocks)

    sizes = _Sizes.from_args(component_bytes, transformer_block_bytes, transformer_block_bytes_fp8, num_blocks,
                             activation_estimate_bytes)
    budget = None
    if free_bytes is not None:
        reserve = reserve_bytes if reserve_bytes is not None else default_reserve(total_bytes or free_bytes)
        budget = int(free_bytes) - int(reserve)
    n_blocks = sizes.num_blocks if sizes else num_blocks

    def plan(resolved: str, reason: str, n: int = 0) -> MemoryPlan:
        offload = resolved != "gpu"
        fp8 = resolved.startswith("fp8")
        tiling = False
        peak = None
        if sizes is not None:
            tiling = offload and budget is not None and sizes.vae_stage(False) > budget >= sizes.vae_stage(True)
            peak = sizes.peak(offload, fp8, n, tiling)
        return MemoryPlan(resolved, offload, fp8, n, reason, requested=mode, num_blocks=n_blocks,
                          peak_bytes=peak, budget_bytes=budget, vae_tiling=tiling)

    if mode != "auto":
        n = 0
        if mode in ("block_swap", "fp8_block_swap"):
            n = _requested_swap(swap_blocks, n_blocks)
            if n is None:
                if sizes is None or budget is None:
                    raise UnsupportedRequestError(
                        f"memory mode {mode} without swap_blocks needs the device's free memory to size the swap "
                        "(a CUDA device); give swap_blocks (e.g. --swap-blocks 16)")
                n = sizes.smallest_swap(mode == "fp8_block_swap", budget)
                reason = (f"{n} blocks is the fewest that fits" if n is not None else
                          "it does not fit even with every block swapped")
                return plan(mode, reason, n if n is not None else sizes.num_blocks)
        return plan(mode, "as requested", n)

    if sizes is None or budget is None:
        raise UnsupportedRequestError("memory mode auto needs the device's free memory and the model's sizes")
    b = sizes
    if b.peak(False, False, 0, False) <= budget:
        return plan("gpu", f"all components ({_gb(b.all_components(False))}) and the working memory fit")
    text_stage, vae_stage = b.text + b.work["text"], b.vae_stage(b.vae_stage(False) > budget)
    if max(text_stage, vae_stage) > budget:
        what = "the text encoders" if text_stage > budget else "the VAE, even tiled,"
        return plan("fp8_block_swap", f"{what} alone need {_gb(max(text_stage, vae_stage))} with their working "
                                      "memory: no mode fits", b.num_blocks)
    if b.transformer_stage(False, 0) <= budget:
        return plan("offload", f"everything at once ({_gb(b.all_components(False))} + working memory) does not "
                               f"fit; the transformer alone ({_gb(b.transformer)}) does")
    why = f"the {_gb(b.transformer)} transformer + {_gb(b.work['transformer'])} working memory does not fit"
    if b.transformer_stage(True, 0) <= budget:
        return plan("fp8", f"{why}; in fp8 ({_gb(b.transformer_fp8)}) it does")
    n = b.smallest_swap(True, budget)
    if n is not None:
        return plan("fp8_block_swap", f"{why}, nor in fp8 ({_gb(b.transformer_fp8)}); swapping the last {n} "
                                      "blocks does", n)
    return plan("fp8_block_swap", f"{why}, nor in fp8 with every block swapped: lower the resolution or "
                                  "the frame count", b.num_blocks)


def _requested_swap(swap_blocks: int | None, num_blocks: int | None) -> int | None:
    if swap_blocks is None:
        return None
    n = int(swap_blocks)
    if n < 1 or (num_blocks is not None and n > num_blocks):
        limit = f"1 and {num_blocks}" if num_blocks else "1 and the number of blocks"
        raise UnsupportedRequestError(f"swap_blocks must be between {limit}, got {swap_blocks}")
    return n


@dataclass
class _Sizes:
    transformer: int
    transformer_fp8: int
    text: int
    vae: int
    blocks: list[int]
    blocks_fp8: list[int]
    work: dict[str, int]

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @classmethod
    def from_args(cls, component_bytes, block_bytes, block_bytes_fp8, num_blocks, working) -> _Sizes | None:
        if component_bytes is None:
            return None
        c = dict(component_bytes)
        transformer = int(c["transformer"])
        transformer_fp8 = int(c.get("transformer_fp8", transformer // 2))
        blocks = _per_block(block_bytes, num_blocks)
        if blocks is None:
            raise UnsupportedRequestError("plan_memory needs transformer_block_bytes with component_bytes")
        blocks_fp8 = _per_block(block_bytes_fp8, len(blocks))
        if blocks_fp8 is None:
            ratio = transformer_fp8 / transformer if transformer else 1.0
            blocks_fp8 = [int(x * ratio) for x in blocks]
        if isinstance(working, Mapping):
            work = {k: int(working.get(k, 0)) for k in ("transformer", "vae", "text")}
            work["vae_tiled"] = int(working.get("vae_tiled", work["vae"]))
        else:
            w = int(working or 0)
            work = {"transformer": w, "vae": w, "vae_tiled": w, "text": w}
        return cls(transformer, transformer_fp8, int(c.get("text", 0)), int(c.get("vae", 0)), blocks, blocks_fp8,
                   work)

    def all_components(self, fp8: bool) -> int:
        return (self.transformer_fp8 if fp8 else self.transformer) + self.text + self.vae

    def resident_transformer(self, fp8: bool, n: int) -> int:
        total, blocks = (self.transformer_fp8, self.blocks_fp8) if fp8 else (self.transformer, self.blocks)
        if n <= 0:
            return total
        swapped = blocks[len(blocks) - n:]
        return total - sum(swapped) + min(2, n) * max(swapped)

    def transformer_stage(self, fp8: bool, n: int) -> int:
        return self.resident_transformer(fp8, n) + self.work["transformer"]

    def vae_stage(self, tiled: bool) -> int:
        return self.vae + self.work["vae_tiled" if tiled else "vae"]

    def peak(self, offload: bool, fp8: bool, n: int, tiled: bool) -> int:
        if not offload:
            work = max(self.work["transformer"], self.work["vae_tiled" if tiled else "vae"], self.work["text"])
            return self.resident_transformer(fp8, n) + self.text + self.vae + work
        return max(self.text + self.work["text"], self.vae_stage(tiled), self.transformer_stage(fp8, n))

    def smallest_swap(self, fp8: bool, budget: int) -> int | None:
        for n in range(1, self.num_blocks + 1):
            if self.transformer_stage(fp8, n) <= budget:
                return n
        return None


def _per_block(value, count) -> list[int] | None:
    if value is None:
        return None
    if isinstance(value, (int, float)):
        if not count:
            raise UnsupportedRequestError("an int transformer_block_bytes needs num_blocks")
        return [int(value)] * int(count)
    return [int(v) for v in value]


def plan_for_device(mode: str, device, sizes: ModelSizes | None, *, dtype: torch.dtype = torch.bfloat16,
                    swap_blocks: int | None = None, plan_for: tuple[int, int, int] | None = None,
                    hidden: int = 3072, patch_size: int = 2, num_blocks: int | None = None,
                    free_memory: tuple[int, int] | None = None) -> MemoryPlan:
    """plan_memory with the device's free memory and the working memory of a `plan_for` = (height, width,
    frames) video with guidance (default 384×672×49). `free_memory` = (free, total) bytes as a memory
    manager reports them (ComfyUI's); by default torch.cuda.mem_get_info. plan_memory checks `mode`."""
    device = torch.device(device)
    free = total = None
    if free_memory is not None and device.type == "cuda":
        free, total = free_memory
    elif device.type == "cuda" and torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info(device)
    height, width, frames = plan_for or DEFAULT_PLAN_SIZE
    vae_dtype = torch.float32 if dtype == torch.float16 else dtype  # as load_vae
    work = estimate_working_bytes(height, width, frames, dtype=dtype, hidden=hidden, patch_size=patch_size,
                                  vae_dtype=vae_dtype)
    return plan_memory(
        mode, free_bytes=free, total_bytes=total, device_type=device.type,
        component_bytes=sizes.component_bytes if sizes else None,
        transformer_block_bytes=list(sizes.blocks) if sizes else None,
        transformer_block_bytes_fp8=list(sizes.blocks_fp8) if sizes else None,
        activation_estimate_bytes=work, swap_blocks=swap_blocks,
        num_blocks=len(sizes.blocks) if sizes else num_blocks)


def with_fp8(plan: MemoryPlan) -> MemoryPlan:
    """The plan with fp8 storage forced on (load_pipeline(fp8=True) with a non-fp8 mode)."""
    if plan.fp8:
        return plan
    return dataclasses.replace(plan, fp8=True, reason=plan.reason + ", with fp8 weights (fp8=True)")


# ------------------------------------------------------------------------------------------ placement
class ResidentPlacement:
    """Components stay where they are (on the pipeline's device): `use` does nothing.

    The placement interface, used by every Pipeline stage:

        with pipeline.placement.use(role, component):   # role: "text", "transformer" or "vae"
            ...                                           # the component is on pipeline.device here

    `component` is what the stage will use (an nn.Module, or the TextEncoders); a placement may
    ignore it (a ComfyUI placement maps the role to its own ModelPatcher). Uses may nest: the
    inner one of the same role must not move anything.
    """

    @contextmanager
    def use(self, role: str, component) -> Iterator[None]:
        yield


class OffloadPlacement(ResidentPlacement):
    """Each component on `device` only inside `use`, on `offload_device` (the CPU) otherwise.

    On leaving (also on errors and interrupts) the component goes back and, on CUDA, the allocator's
    cache is emptied, so the next stage finds the memory free.
    """

    def __init__(self, device, offload_device="cpu"):
        self.device = torch.device(device)
        self.offload_device = torch.device(offload_device)
        self.active: dict[str, int] = {}  # role -> nesting depth, for tests and logging

    @contextmanager
    def use(self, role: str, component) -> Iterator[None]:
        if component is None or self.active.get(role):
            self.active[role] = self.active.get(role, 0) + 1
            try:
                yield
            finally:
                self.active[role] -= 1
            return
        self.active[role] = 1
        try:
            component.to(self.device)
            yield
        finally:
            self.active[role] = 0
            try:
                component.to(self.offload_device)
            finally:
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------ load_pipeline glue
def plan_for_files(files, mode: str, device, dtype: torch.dtype, *, fp8: bool = False,
                   swap_blocks: int | None = None, plan_for: tuple[int, int, int] | None = None,
                   free_memory: tuple[int, int] | None = None) -> MemoryPlan:
    """The plan load_pipeline follows for a validated model folder (sizes read from headers on CUDA only);
    `free_memory` as in plan_for_device."""
    from .models.transformer import TransformerConfig

    device = torch.device(device)
    check_mode(mode)
    cfg = TransformerConfig.from_dict(files.transformer_config)
    sizes = model_sizes(files, dtype) if device.type == "cuda" else None
    plan = plan_for_device(mode, device, sizes, dtype=dtype, swap_blocks=swap_blocks, plan_for=plan_for,
                           hidden=cfg.inner_dim, patch_size=cfg.patch_size, num_blocks=cfg.num_layers,
                           free_memory=free_memory)
    return with_fp8(plan) if fp8 else plan


def apply_plan(pipe, plan: MemoryPlan):
    """Set up a freshly loaded Pipeline (weights already where `plan` wants them) and return it."""
    from .block_swap import enable_block_swap

    if plan.offload:
        pipe.placement = OffloadPlacement(pipe.device)
    if plan.swap_blocks:
        enable_block_swap(pipe.transformer, plan.swap_blocks, pipe.device)
    if plan.vae_tiling:
        pipe.set_vae_tiling(True)
    pipe.memory_plan = plan
    return pipe
