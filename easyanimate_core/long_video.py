"""Videos longer than one clip: chunked continuation (the original's method) and sliding context windows.

**continue** (InP models): chunk by chunk, as the original Gradio UI's "Long Video Generation" does.
Each chunk after the first is an image-to-video run whose first `overlap` frames are the last `overlap`
frames of the video so far (passed through uint8, truncated), known through the InP mask; the overlap
is cross-faded with weights i/K. The last chunk is the remainder rounded down to 4k+1 frames, so the
video can come out a little shorter than asked (21 → 20 with chunk 9 / overlap 4; 145 → 144 with 49 / 4).

**windows** (every model kind): the whole long latent is denoised at once; at each step the transformer
sees overlapping windows of the chunk length (each with its own RoPE time positions from 0, inpaint and
control latents sliced with it) and the window predictions are fused with linear or pyramid weights
before the scheduler step. It runs through the `model_fn` seam of `Pipeline.denoise`.

Random draws when `chunk_latents` / `chunk_reference_noise` are not given (continue mode; this is the
original's order, so a seed gives the original's video):
  1. chunk c's initial noise is the c-th `torch.randn((1,16,T_c,h,w))` draw of ONE
     `torch.Generator("cpu").manual_seed(seed)`, in chunk order;
  2. each chunk with known frames (c ≥ 1, or chunk 0 with a start image, or a single chunk with an end
     image) draws its unit reference noise from a SECOND generator seeded with `seed` (the original's
     global RNG after `torch.manual_seed(seed)`), in chunk order, as
     `torch.empty((1,L,3,H,W)).permute(0,2,1,3,4).normal_()` (the original's memory order), scaled by
     0.0563 and added to the known pixels only.
The user's global torch RNG is never touched. In windows mode there is one "chunk": the draws are
`Pipeline.generate`'s (initial noise, then reference noise, from one generator seeded with `seed`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from .buckets import VAE_TEMPORAL_COMPRESSION, floor_to_multiple, latent_frames, round_frames
from .conditioning import frames_to_video
from .context_windows import FUSE_METHODS, WindowedModel, plan_windows, window_overlap_latents
from .errors import UnsupportedRequestError
from .pipeline import DEFAULT_NOISE_AUG_STRENGTH, StepInfo
from .samplers import check_steps
from .text import PromptEmbeds

MODES = ("continue", "windows")


@dataclass(frozen=True)
class Chunk:
    """One clip of a continuation: output frames [start, start + length), the first `known` of them given."""

    index: int
    start: int
    length: int
    known: int

    @property
    def end(self) -> int:
        return self.start + self.length


@dataclass
class LongVideoResult:
    frames: torch.Tensor                 # [F,H,W,3] float32 0..1 on CPU
    chunk_latents: list                  # each chunk's final latents [1,16,T,h,w] (windows: one entry)
    mode: str = "continue"
    chunks: list = field(default_factory=list)   # continue: the Chunk schedule that ran
    windows: list = field(default_factory=list)  # windows: (start, stop) latent-frame ranges
    transformer_passes: int = 0          # transformer calls made (CFG halves batched into one call)
    notes: list = field(default_factory=list)    # what was adjusted (frames dropped, a single clip, ...)

    def describe(self) -> str:
        """One line for logs and the node: what ran."""
        frames = self.frames.shape[0]
        if self.mode == "continue":
            return f"continue: {len(self.chunks)} chunks of up to {max(c.length for c in self.chunks)} frames, " \
                   f"{frames} frames"
        return f"windows: {len(self.windows)} windows of {self.windows[0][1] - self.windows[0][0]} latent frames " \
               f"per step, {frames} frames"


@dataclass
class LongStepInfo(StepInfo):
    """StepInfo with overall progress: `step`/`total` count over all chunks × steps."""

    chunk: int = 0     # 0-based chunk index (windows: always 0)
    chunks: int = 1


# ---------------------------------------------------------------------------------------------- plans

def check_lengths(chunk_frames: int, overlap_frames: int) -> None:
    """Refuse a chunk length that is not 4k+1 (≥ 5) or an overlap outside 1 … chunk − 1."""
    if chunk_frames < 5 or (chunk_frames - 1) % VAE_TEMPORAL_COMPRESSION:
        raise UnsupportedRequestError(
            f"chunk_frames must be 4k+1 and at least 5 (e.g. 49, the trained length, or 25); got {chunk_frames}")
    if not 1 <= overlap_frames < chunk_frames:
        raise UnsupportedRequestError(
            f"overlap_frames must be at least 1 and below chunk_frames ({chunk_frames}); got {overlap_frames}")


def plan_chunks(num_frames: int, chunk_frames: int, overlap_frames: int) -> tuple[list[Chunk], list[str]]:
    """The original's chunk schedule, and notes on frames it cannot make.

    Chunks of `chunk_frames` start `chunk_frames − overlap` apart; the last one is the remainder rounded
    down to 4k+1. A remainder that adds no new frame (≤ overlap; the original crashes there when it is
    below the overlap) is skipped.
    """
    check_lengths(chunk_frames, overlap_frames)
    notes = []
    if num_frames < chunk_frames:
        length = round_frames(num_frames)
        notes.append(f"{num_frames} frames is shorter than one chunk ({chunk_frames}): made as a single clip "
                     f"of {length} frames")
        return [Chunk(0, 0, length, 0)], notes
    chunks, start, last = [], 0, chunk_frames
    while start < num_frames:
        length = chunk_frames
        if last >= num_frames:
            length = (num_frames - start - 1) // VAE_TEMPORAL_COMPRESSION * VAE_TEMPORAL_COMPRESSION + 1
            if length <= 0:
                break
            if chunks and length <= overlap_frames:
                notes.append(f"the last {num_frames - start - overlap_frames} requested frames would need a chunk "
                             f"of {length} frames, no longer than the overlap: skipped")
                break
        chunks.append(Chunk(len(chunks), start, length, overlap_frames if chunks else 0))
        if last >= num_frames:
            break
        start += length - overlap_frames
        last = start + length
    made = chunks[-1].end
    if made < num_frames and not notes:
        notes.append(f"{num_frames} frames requested, {made} made: the last chunk is rounded down to 4k+1 frames, "
                     "as in the original")
    return chunks, notes


def crossfade_weights(overlap: int) -> torch.Tensor:
    """The original's cross-fade weights of the new chunk, float32(i / K) for i = 0 … K−1."""
    return torch.tensor([i / overlap for i in range(overlap)], dtype=torch.float32).view(-1, 1, 1, 1)


def to_uint8_frames(frames: torch.Tensor) -> torch.Tensor:
    """The original's hand-over to the next chunk: (frames × 255) truncated to uint8 (not rounded)."""
    return (frames * 255).to(torch.uint8)


def prompt_per_part(prompt, parts: int, what: str) -> list:
    """One prompt for each chunk/window: a single prompt everywhere, or a list whose last entry repeats."""
    prompts = [prompt] if isinstance(prompt, (str, PromptEmbeds)) else list(prompt)
    if not prompts:
        raise UnsupportedRequestError("the prompt list is empty; give at least one prompt")
    if len(prompts) > parts:
        raise UnsupportedRequestError(
            f"{len(prompts)} prompts for {parts} {what}{'s' if parts != 1 else ''}: give at most {parts} "
            f"(one per {what}; the last repeats) or make the video longer")
    return prompts + [prompts[-1]] * (parts - len(prompts))


# ---------------------------------------------------------------------------------------------- entry point

def generate_long(pipe, prompt, negative_prompt="", *, height: int, width: int, num_frames: int,
                  chunk_frames: int = 49, overlap_frames: int = 4, mode: str = "continue",
                  num_inference_steps: int = 50, guidance_scale: float = 6.0, sampler: str = "DDIM", seed: int = 43,
                  start_image=None, end_image=None, control_video=None, chunk_latents=None,
                  chunk_reference_noise=None, callback: Optional[Callable[[LongStepInfo], None]] = None,
                  fuse: str = "linear", on_chunk: Optional[Callable[[int, int], None]] = None) -> LongVideoResult:
    """A video of `num_frames` frames from chunks of `chunk_frames`; see the module docstring.

    `prompt` / `negative_prompt` may be text or already encoded `PromptEmbeds`; `prompt` may be a list
    (one per chunk or window, the last repeats). `fuse` ("linear"/"pyramid") is the windows' overlap
    weighting. `on_chunk(index, count)` is called before each chunk/window pass set starts (for nodes).
    """
    if mode not in MODES:
        raise UnsupportedRequestError(f"mode must be one of {', '.join(MODES)}; got {mode!r}")
    if fuse not in FUSE_METHODS:
        raise UnsupportedRequestError(f"fuse must be one of {', '.join(FUSE_METHODS)}; got {fuse!r}")
    check_lengths(int(chunk_frames), int(overlap_frames))
    check_steps(sampler, num_inference_steps)
    if int(num_frames) < 1:
        raise UnsupportedRequestError(f"num_frames must be at least 1; got {num_frames}")
    height, width = floor_to_multiple(height), floor_to_multiple(width)
    if height < 16 or width < 16:
        raise UnsupportedRequestError(f"height and width must be at least 16 pixels, got {height}x{width}")
    run = _continue if mode == "continue" else _windows
    return run(pipe, prompt, negative_prompt, height=height, width=width, num_frames=int(num_frames),
               chunk_frames=int(chunk_frames), overlap_frames=int(overlap_frames),
               num_inference_steps=int(num_inference_steps), guidance_scale=float(guidance_scale), sampler=sampler,
               seed=int(seed), start_image=start_image, end_image=end_image, control_video=control_video,
               chunk_latents=chunk_latents, chunk_reference_noise=chunk_reference_noise, callback=callback,
               fuse=fuse, on_chunk=on_chunk)


def _embeds(pipe, prompt) -> PromptEmbeds:
    return prompt if isinstance(prompt, PromptEmbeds) else pipe.encode_prompt(prompt or "")


def _per_chunk(values, count: int, what: str):
    if values is None:
        return [None] * count
    values = list(values)
    if len(values) != count:
        raise UnsupportedRequestError(f"{what} has {len(values)} entries but this video has {count} chunks "
                                      f"(one entry per chunk)")
    return values


def _overall_progress(callback, chunk: int, chunks: int):
    """Per-chunk StepInfo → LongStepInfo counting over all chunks (each runs the same schedule)."""
    if callback is None:
        return None

    def report(info: StepInfo) -> None:
        callback(LongStepInfo(chunk * info.total + info.step, chunks * info.total, info.timestep, info.latents,
                              info.denoised, chunk=chunk, chunks=chunks))
    return report


# ---------------------------------------------------------------------------------------------- continue

def _continue(pipe, prompt, negative_prompt, *, height, width, num_frames, chunk_frames, overlap_frames,
              num_inference_steps, guidance_scale, sampler, seed, start_image, end_image, control_video,
              chunk_latents, chunk_reference_noise, callback, fuse, on_chunk) -> LongVideoResult:
    if pipe.kind != "inpaint":
        raise UnsupportedRequestError(
            f"continue mode hands the last frames of each chunk to the next as known frames, which only an InP "
            f"model can take; this is a {pipe.kind} model. Load an InP model (e.g. EasyAnimateV5-12b-zh-InP), "
            f"or use mode 'windows' (sliding context windows work with every model kind"
            f"{', and with a control video' if pipe.kind == 'control' else ''}).")
    if control_video is not None:
        raise UnsupportedRequestError("a control video needs a Control model and mode 'windows'")
    chunks, notes = plan_chunks(num_frames, chunk_frames, overlap_frames)
    prompts = prompt_per_part(prompt, len(chunks), "chunk")
    init_noises = _per_chunk(chunk_latents, len(chunks), "chunk_latents")
    ref_noises = _per_chunk(chunk_reference_noise, len(chunks), "chunk_reference_noise")
    use_cfg = guidance_scale > 1.0
    negative = _embeds(pipe, negative_prompt) if use_cfg else None
    noise_generator = torch.Generator("cpu").manual_seed(seed)      # the original's pipeline generator
    reference_generator = torch.Generator("cpu").manual_seed(seed)  # the original's global RNG
    h, w = height // 8, width // 8
    out = torch.empty(chunks[-1].end, height, width, 3)
    finals = []
    for chunk, text, init_noise, ref_noise in zip(chunks, prompts, init_noises, ref_noises):
        is_last = chunk.index == len(chunks) - 1
        shape = (1, pipe.transformer.config.out_channels, latent_frames(chunk.length), h, w)
        drawn = torch.randn(shape, generator=noise_generator, dtype=torch.float32)
        inputs = _chunk_inputs(chunk, out, height, width, start_image if chunk.index == 0 else None,
                               end_image if is_last else None)
        if inputs["known"]:  # drawn even when given, so a given entry leaves the later draws in place
            unit = torch.empty((1, chunk.length, 3, height, width)).permute(0, 2, 1, 3, 4)
            drawn_ref = unit.normal_(generator=reference_generator) * DEFAULT_NOISE_AUG_STRENGTH
            ref_noise = drawn_ref if ref_noise is None else ref_noise
        if on_chunk is not None:
            on_chunk(chunk.index, len(chunks))
        conditioning = pipe.prepare(
            height=height, width=width, num_frames=chunk.length, num_inference_steps=num_inference_steps,
            sampler=sampler, seed=seed, latents=drawn if init_noise is None else init_noise,
            reference_noise=ref_noise, **inputs["prepare"])
        final = pipe.denoise(conditioning, _embeds(pipe, text), negative, guidance_scale,
                             _overall_progress(callback, chunk.index, len(chunks)))
        finals.append(final.cpu())
        _stitch(out, chunk, pipe.decode(final))
    return LongVideoResult(frames=out, chunk_latents=finals, mode="continue", chunks=chunks,
                           transformer_passes=len(chunks) * num_inference_steps, notes=notes)


def _chunk_inputs(chunk: Chunk, out: torch.Tensor, height: int, width: int, start_image, end_image) -> dict:
    """The prepare() inputs of one chunk, as the original's get_image_to_video_latent builds them."""
    if chunk.known == 0:
        return {"known": start_image is not None or end_image is not None,
                "prepare": {"start_image": start_image, "end_image": end_image}}
    start = to_uint8_frames(out[chunk.start:chunk.start + chunk.known])
    # The known frames, then copies of the first of them (masked out, so only their presence matters).
    video = torch.cat([start, start[:1].expand(chunk.length - chunk.known, -1, -1, -1)]).float() / 255.0
    mask = torch.ones(chunk.length, height, width)
    mask[:chunk.known] = 0
    if end_image is not None:
        video[-1] = frames_to_video(end_image, height, width, "end_image")[0, :, 0].permute(1, 2, 0)
        mask[-1] = 0
    return {"known": True, "prepare": {"video": video, "mask": mask}}


def _stitch(out: torch.Tensor, chunk: Chunk, frames: torch.Tensor) -> None:
    """Write a decoded chunk into the output, cross-fading the overlap as the original does."""
    k = chunk.known
    if k:
        r = crossfade_weights(k)
        seam = out[chunk.start:chunk.start + k]
        seam.copy_(seam * (1 - r) + frames[:k] * r)
    out[chunk.start + k:chunk.end] = frames[k:]


# ---------------------------------------------------------------------------------------------- windows

def _windows(pipe, prompt, negative_prompt, *, height, width, num_frames, chunk_frames, overlap_frames,
             num_inference_steps, guidance_scale, sampler, seed, start_image, end_image, control_video,
             chunk_latents, chunk_reference_noise, callback, fuse, on_chunk) -> LongVideoResult:
    notes = []
    if control_video is not None:
        available = torch.as_tensor(control_video).shape[0]
        if available < num_frames:
            notes.append(f"the control video has {available} frames: making {round_frames(available)}")
            num_frames = available
    frames = round_frames(num_frames)
    if frames != num_frames:
        notes.append(f"{num_frames} frames is not 4k+1: making {frames}")
    if frames < chunk_frames:
        notes.append(f"{frames} frames fit in one window of {chunk_frames}: made as a single clip")
    window = latent_frames(chunk_frames)
    windows = plan_windows(latent_frames(frames), window, window_overlap_latents(overlap_frames, window))
    prompts = prompt_per_part(prompt, len(windows), "window")
    init_noise = _per_chunk(chunk_latents, 1, "chunk_latents (windows mode: one entry)")[0]
    ref_noise = _per_chunk(chunk_reference_noise, 1, "chunk_reference_noise (windows mode: one entry)")[0]
    conditioning = pipe.prepare(height=height, width=width, num_frames=frames, num_inference_steps=num_inference_steps,
                                sampler=sampler, seed=seed, start_image=start_image, end_image=end_image,
                                control_video=control_video, latents=init_noise, reference_noise=ref_noise)
    use_cfg = guidance_scale > 1.0
    negative = _embeds(pipe, negative_prompt) if use_cfg else None
    texts = [_embeds(pipe, p) for p in prompts]
    fused = WindowedModel(windows, fuse, texts if len(set(map(id, texts))) > 1 else None, negative, on_chunk)
    final = pipe.denoise(conditioning, texts[0], negative, guidance_scale,
                         _overall_progress(callback, 0, 1), model_fn=fused)
    return LongVideoResult(frames=pipe.decode(final), chunk_latents=[final.cpu()], mode="windows",
                           windows=windows, transformer_passes=fused.passes, notes=notes)
