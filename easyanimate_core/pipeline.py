"""Generation: text/image/video/control → video, with classifier-free guidance.

One `Pipeline` per loaded model. `generate()` runs the whole job; the stages it is made of
(`encode_prompt`, `prepare`, `denoise`, `decode`) are public so callers such as ComfyUI nodes can
run them separately. The model objects are never modified, so an error or an interrupt in any
stage leaves the pipeline exactly as it was.

Each stage gets its component onto the device through `pipeline.placement` (memory.py): by default
everything is resident and nothing moves; with offload, a component is on the device only during the
stage that uses it.
"""
from __future__ import annotations

import inspect
from collections import OrderedDict
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from . import conditioning as cond
from .buckets import floor_to_multiple, latent_frames, round_frames
from .block_swap import reset_block_swap
from .cache import CacheSettings, CacheStats, StepCache, make_step_cache
from .errors import UnsupportedRequestError
from .memory import ResidentPlacement
from .samplers import DEFAULT_SAMPLER, check_steps, make_scheduler
from .text import PromptEmbeds, TextEncoders
from .vae_io import decode_latents

DEFAULT_NEGATIVE_PROMPT = "扭曲的身体，肢体残缺，文本字幕，漫画，静止，丑陋，错误，乱码。"
DEFAULT_NOISE_AUG_STRENGTH = 0.0563
KIND_NAMES = {"t2v": "text-to-video (T2V)", "inpaint": "InP (image/video-conditioned)", "control": "Control"}
_PROMPT_CACHE_SIZE = 8
# model_fn(transformer, model_in, timestep, text, inpaint, control) -> prediction; see Pipeline.denoise
ModelFn = Callable[..., torch.Tensor]


@dataclass
class GenerationResult:
    frames: torch.Tensor   # [F,H,W,3] float32 0..1 on CPU
    latents: torch.Tensor  # [1,16,T,h,w] final latents, still scaled by the VAE scaling factor
    cache_stats: Optional[CacheStats] = None  # what the step cache skipped, when one was used


@dataclass
class StepInfo:
    """What a progress callback receives after each denoising step."""

    step: int              # 1-based
    total: int
    timestep: float
    latents: torch.Tensor  # current latents [1,16,T,h,w]
    denoised: Optional[torch.Tensor] = None  # the sampler's x0 estimate, when it provides one


@dataclass
class Conditioning:
    """Everything `denoise` needs besides the text: sizes, timesteps, initial latents, extra channels."""

    height: int
    width: int
    num_frames: int
    timesteps: torch.Tensor
    latents: torch.Tensor          # initial latents, already scaled by init_noise_sigma / noised to t0
    scheduler: object
    inpaint_latents: Optional[torch.Tensor] = None
    control_latents: Optional[torch.Tensor] = None
    generator: Optional[torch.Generator] = None


class Pipeline:
    """A loaded EasyAnimate V5 model: transformer, VAE, text encoders and scheduler config."""

    def __init__(self, *, transformer, vae, text_encoders: TextEncoders, scheduler_config: dict, kind: str,
                 add_noise_in_inpaint_model: bool, device: torch.device, dtype: torch.dtype, model_dir=None,
                 placement=None):
        self.transformer = transformer
        self.vae = vae
        self.text_encoders = text_encoders
        self.scheduler_config = dict(scheduler_config)
        self.kind = kind
        self.add_noise_in_inpaint_model = add_noise_in_inpaint_model
        self.device = torch.device(device)
        self.dtype = dtype
        self.model_dir = model_dir
        # Gets each component onto `device` for the stage using it (memory.py); default: resident, no moves.
        self.placement = placement if placement is not None else ResidentPlacement()
        self.memory_plan = None  # the MemoryPlan load_pipeline followed, if any
        self._prompt_cache: OrderedDict[str, PromptEmbeds] = OrderedDict()
        self.last_cache_stats: Optional[CacheStats] = None  # the step cache's report of the last denoise

    # ------------------------------------------------------------------ options
    def set_vae_tiling(self, enabled: bool, tile_sample_min_size: int = 384, tile_overlap_factor: float = 0.25):
        """Spatial VAE tiling for large frames: bounded memory, blended seams (off by default)."""
        if enabled:
            self.vae.enable_tiling(tile_sample_min_size, tile_overlap_factor)
        else:
            self.vae.disable_tiling()

    def set_loras(self, loras):
        """Compute with exactly these LoRAs, [(path, strength), ...] ([] = none); base weights are never written.

        Works with block swap on: the swapped blocks get their real tensors back while the LoRAs are set,
        and their LoRA factors are swapped with them afterwards.
        """
        from .lora import set_loras

        return set_loras(self.transformer, list(loras))

    def _use(self, role: str):
        """The placement's context for one stage's component ("text", "transformer" or "vae")."""
        component = {"text": self.text_encoders, "transformer": self.transformer, "vae": self.vae}[role]
        return self.placement.use(role, component)

    # ------------------------------------------------------------------ text
    def encode_prompt(self, prompt: str) -> PromptEmbeds:
        """Encode one prompt (cached: re-encoding the same text is free)."""
        cached = self._prompt_cache.get(prompt)
        if cached is None:
            with self._use("text"):
                cached = self.text_encoders.encode([prompt]).to("cpu", torch.float32)
            self._prompt_cache[prompt] = cached
            while len(self._prompt_cache) > _PROMPT_CACHE_SIZE:
                self._prompt_cache.popitem(last=False)
        else:
            self._prompt_cache.move_to_end(prompt)
        return cached

    # ------------------------------------------------------------------ checks
    def _refuse(self, what: str, use: str) -> UnsupportedRequestError:
        return UnsupportedRequestError(
            f"this is an EasyAnimate V5 {KIND_NAMES[self.kind]} model; it cannot take {what}. {use}")

    def check_request(self, *, start_image=None, end_image=None, video=None, mask=None, control_video=None,
                      strength: float = 1.0, video_latent_dist=None) -> None:
        """Refuse inputs the loaded model kind cannot use, saying which model to load instead."""
        has_keyframes = start_image is not None or end_image is not None
        has_start_video = video is not None or video_latent_dist is not None
        if not 0.0 < strength <= 1.0:
            raise UnsupportedRequestError(f"strength must be in (0, 1], got {strength}")
        if self.kind == "t2v":
            if has_keyframes:
                raise self._refuse("a start or end image", "Load an InP model (e.g. EasyAnimateV5-12b-zh-InP) "
                                   "for image-to-video.")
            if mask is not None:
                raise self._refuse("a mask", "Load an InP model (e.g. EasyAnimateV5-12b-zh-InP) for region editing.")
        if self.kind == "control":
            if has_keyframes or has_start_video or mask is not None:
                raise self._refuse("a start/end image, an input video or a mask",
                                   "It takes a control video only; load an InP model for image/video conditioning.")
            if control_video is None:
                raise UnsupportedRequestError(
                    "a Control model needs a control video (pose, canny, depth… frames); pass control_video, "
                    "or load a T2V/InP model for text-to-video.")
        elif control_video is not None:
            raise self._refuse("a control video", "Load EasyAnimateV5-12b-zh-Control for control-video generation.")
        if has_keyframes and video is not None:
            raise UnsupportedRequestError("give either start/end images or an input video, not both")
        if mask is not None and video is None:
            raise UnsupportedRequestError("a mask needs an input video to edit (video=…)")
        if strength < 1.0 and not has_start_video:
            raise UnsupportedRequestError("strength < 1 is video-to-video and needs an input video (video=…)")
        if video is not None and mask is None and strength >= 1.0:
            raise UnsupportedRequestError(
                "an input video without a mask at strength 1.0 would be ignored: use strength < 1 for "
                "video-to-video (0.7 is the usual value), or give a mask for region editing")

    # ------------------------------------------------------------------ conditioning
    @torch.inference_mode()
    def prepare(self, *, height: int = 384, width: int = 672, num_frames: int = 49, num_inference_steps: int = 50,
                sampler: str = DEFAULT_SAMPLER, seed: int = 43, start_image=None, end_image=None, video=None,
                mask=None, strength: float = 1.0, control_video=None, latents=None,
                noise_aug_strength: float = DEFAULT_NOISE_AUG_STRENGTH, reference_noise=None,
                video_noise=None, video_latent_dist=None) -> Conditioning:
        """Sizes, scheduler, initial latents and conditioning latents for one generation.

        `video_latent_dist` is an already encoded input video (the VAE posterior, with `.mean` and
        `.std`, unscaled) to start video-to-video from instead of encoding `video` again.
        """
        self.check_request(start_image=start_image, end_image=end_image, video=video, mask=mask,
                           control_video=control_video, strength=strength, video_latent_dist=video_latent_dist)
        check_steps(sampler, num_inference_steps)
        height, width = floor_to_multiple(height), floor_to_multiple(width)
        if height < 16 or width < 16:
            raise UnsupportedRequestError(f"height and width must be at least 16 pixels, got {height}x{width}")
        for given in (video, control_video):
            if given is not None:
                num_frames = min(num_frames, torch.as_tensor(given).shape[0])
        num_frames = round_frames(num_frames)
        shape = (1, self.transformer.config.out_channels, latent_frames(num_frames), height // 8, width // 8)

        # Seed convention: the initial noise is always drawn first, then the reference and
        # video-posterior noise, so that an explicit tensor leaves later draws where they were.
        generator = torch.Generator("cpu").manual_seed(int(seed))
        drawn = torch.randn(shape, generator=generator, dtype=torch.float32)
        noise = drawn if latents is None else torch.as_tensor(latents, dtype=torch.float32).reshape(shape)

        scheduler = make_scheduler(sampler, self.scheduler_config)
        scheduler.set_timesteps(int(num_inference_steps), device=self.device)
        timesteps = scheduler.timesteps
        if strength < 1.0:
            kept = min(int(num_inference_steps * strength), int(num_inference_steps))
            if kept < 1:
                raise UnsupportedRequestError(
                    f"strength {strength} × {num_inference_steps} steps leaves no step to run; raise either")
            start = (int(num_inference_steps) - kept) * scheduler.order
            timesteps = timesteps[start:]
            if hasattr(scheduler, "set_begin_index"):
                scheduler.set_begin_index(start)

        # One VAE placement around every encode below (moving it on and off the device once).
        needs_vae = (self.kind == "control" or (strength < 1.0 and video_latent_dist is None)
                     or (self.kind == "inpaint" and any(x is not None for x in (video, start_image, end_image))))
        with self._use("vae") if needs_vae else nullcontext():
            inpaint_latents = control_latents = None
            pixel_video = None
            if video is not None:
                pixel_video = cond.frames_to_video(torch.as_tensor(video)[:num_frames], height, width, "video")
            if self.kind == "inpaint":
                inpaint_latents = self._inpaint_latents(shape, pixel_video, mask, start_image, end_image, num_frames,
                                                        height, width, generator, noise_aug_strength, reference_noise)
            if self.kind == "control":
                control = cond.frames_to_video(torch.as_tensor(control_video)[:num_frames], height, width,
                                               "control_video")
                control_latents = self._encode(control * 2 - 1).mode() * self.vae.scaling_factor

            if strength < 1.0:
                posterior = video_latent_dist if video_latent_dist is not None else self._encode(pixel_video * 2 - 1)
                if tuple(posterior.mean.shape) != shape:
                    raise UnsupportedRequestError(
                        f"the encoded input video has latent shape {tuple(posterior.mean.shape)} but this generation "
                        f"needs {shape} ({num_frames} frames at {width}x{height})")
                if video_noise is None:
                    video_noise = torch.randn(posterior.mean.shape, generator=generator, dtype=torch.float32)
                video_latents = posterior.sample(noise=torch.as_tensor(video_noise).to(posterior.mean)) \
                    * self.vae.scaling_factor
                init = scheduler.add_noise(video_latents.to(self.device, torch.float32), noise.to(self.device),
                                           timesteps[:1])
            else:
                init = noise.to(self.device) * scheduler.init_noise_sigma
            return Conditioning(height=height, width=width, num_frames=num_frames, timesteps=timesteps,
                                latents=init.float(), scheduler=scheduler, inpaint_latents=inpaint_latents,
                                control_latents=control_latents, generator=generator)

    def _encode(self, pixels: torch.Tensor):
        with self._use("vae"):
            return self.vae.encode(pixels.to(self.device, self.vae.dtype))

    def _inpaint_latents(self, shape, pixel_video, mask, start_image, end_image, num_frames, height, width,
                         generator, noise_aug_strength, reference_noise) -> torch.Tensor:
        if pixel_video is not None:
            video01 = pixel_video
            gen_mask = (cond.mask_to_video_mask(mask, num_frames, height, width) if mask is not None
                        else torch.ones(1, 1, num_frames, height, width))
        else:
            video01, gen_mask = cond.keyframe_inputs(start_image, end_image, num_frames, height, width)
        if bool((gen_mask >= 0.5).all()):
            # Nothing is known: the original feeds literal zeros, not the encoding of a blank video.
            return torch.zeros((shape[0], 1 + shape[1]) + shape[2:], device=self.device, dtype=torch.float32)
        pixels = cond.masked_video(video01, gen_mask)
        if self.add_noise_in_inpaint_model:
            if reference_noise is None:
                reference_noise = torch.randn(pixels.shape, generator=generator, dtype=torch.float32) \
                    * noise_aug_strength
            pixels = cond.add_reference_noise(pixels, torch.as_tensor(reference_noise))
        masked_latents = self._encode(pixels).mode() * self.vae.scaling_factor
        known = cond.resize_mask_to_latents(1 - gen_mask, shape).to(masked_latents) * self.vae.scaling_factor
        return torch.cat([known, masked_latents], dim=1).float()

    # ------------------------------------------------------------------ denoising
    @torch.inference_mode()
    def denoise(self, conditioning: Conditioning, positive: PromptEmbeds, negative: Optional[PromptEmbeds] = None,
                guidance_scale: float = 6.0, callback: Optional[Callable[[StepInfo], None]] = None, *,
                model_fn: Optional[ModelFn] = None, step_hook: Optional[Callable[[int, int], None]] = None,
                cache: CacheSettings | StepCache | None = None) -> torch.Tensor:
        """Run the sampler from `conditioning.latents`; returns the final latents (float32, scaled).

        Two seams for features built on this loop (it is the only denoise loop):
        - `model_fn(transformer, model_in, timestep, text, inpaint, control) -> prediction` replaces the
          single transformer call of a step (context windows call it once per window and fuse);
          default `call_transformer`.
        - `step_hook(index, total)` is called before each step's model call (0-based index), e.g. so a
          step cache knows where in the schedule it is.

        `cache` (cache.py: CacheSettings, or a StepCache built by the caller) skips transformer passes that
        would change little; it is installed on the transformer for this call only (removed on any exit),
        and its report is left in `self.last_cache_stats` (or the StepCache's `.stats`).
        """
        step_cache = cache if isinstance(cache, StepCache) or cache is None else \
            make_step_cache(cache, self.transformer, self.model_dir)
        self.last_cache_stats = None
        if step_cache is not None:
            user_hook = step_hook

            def step_hook(i, total):
                step_cache.step_hook(i, total)
                if user_hook is not None:
                    user_hook(i, total)
        use_cfg = guidance_scale > 1.0 and negative is not None
        text = PromptEmbeds.cat([negative, positive]) if use_cfg else positive
        model_dtype = self.transformer.compute_dtype
        text = text.to(self.device, model_dtype)
        batch = 2 if use_cfg else 1

        def repeat(t):
            return None if t is None else t.to(self.device, model_dtype).repeat(batch, 1, 1, 1, 1)

        inpaint, control = repeat(conditioning.inpaint_latents), repeat(conditioning.control_latents)
        scheduler = conditioning.scheduler
        step_kwargs = {"generator": conditioning.generator} if _accepts(scheduler.step, "generator") else {}
        if _accepts(scheduler.step, "eta"):
            step_kwargs["eta"] = 0.0
        # Everything per step is prepared here, once: the loop issues no host<->device synchronisation of
        # its own (no float(t), no tensors built on the host). The scheduler gets the timestep as a CPU
        # scalar tensor (same values, so the same results): indexing its CPU tables with a device
        # tensor would synchronise on every step.
        host_timesteps = conditioning.timesteps.cpu()
        step_values = host_timesteps.tolist()
        model_timesteps = conditioning.timesteps.to(self.device, torch.float32)
        total = len(step_values)
        with self._use("transformer"), step_cache.installed(self.transformer) if step_cache else nullcontext():
            try:
                latents = conditioning.latents.to(self.device)
                for i in range(total):
                    t = host_timesteps[i]
                    model_in = scheduler.scale_model_input(torch.cat([latents] * batch), t)
                    timestep = model_timesteps[i].expand(batch)
                    if step_hook is not None:
                        step_hook(i, total)
                    pred = (model_fn or call_transformer)(self.transformer, model_in.to(model_dtype), timestep, text,
                                                          inpaint, control).float()
                    if use_cfg:
                        uncond, cond_pred = pred.chunk(2)
                        pred = uncond + guidance_scale * (cond_pred - uncond)
                    out = scheduler.step(pred, t, latents, **step_kwargs, return_dict=True)
                    latents = out.prev_sample
                    if callback is not None:
                        callback(StepInfo(i + 1, total, float(step_values[i]), latents,
                                          getattr(out, "pred_original_sample", None)))
            finally:
                reset_block_swap(self.transformer)  # an interrupt inside a swapped block leaves nothing behind
        if step_cache is not None:
            self.last_cache_stats = step_cache.stats
        return latents

    # ------------------------------------------------------------------ decoding
    @torch.inference_mode()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents [1,16,T,h,w] → frames [F,H,W,3] float32 0..1 on CPU."""
        with self._use("vae"):
            return decode_latents(self.vae, latents, self.device)

    # ------------------------------------------------------------------ all in one
    def generate(self, prompt: str, negative_prompt: str = "", height: int = 384, width: int = 672,
                 num_frames: int = 49, num_inference_steps: int = 50, guidance_scale: float = 6.0,
                 sampler: str = DEFAULT_SAMPLER, seed: int = 43, start_image=None, end_image=None, video=None,
                 mask=None, strength: float = 1.0, control_video=None, latents=None,
                 noise_aug_strength: float = DEFAULT_NOISE_AUG_STRENGTH, reference_noise=None, video_noise=None,
                 callback: Optional[Callable[[StepInfo], None]] = None,
                 cache: CacheSettings | StepCache | None = None) -> GenerationResult:
        """Generate a video; see the README for what each input does and which model kind takes it.

        `cache`: a step cache (cache.py), e.g. `CacheSettings.parse("auto:0.1")`; its skip counts come back
        in `result.cache_stats`.
        """
        conditioning = self.prepare(
            height=height, width=width, num_frames=num_frames, num_inference_steps=num_inference_steps,
            sampler=sampler, seed=seed, start_image=start_image, end_image=end_image, video=video, mask=mask,
            strength=strength, control_video=control_video, latents=latents,
            noise_aug_strength=noise_aug_strength, reference_noise=reference_noise, video_noise=video_noise)
        positive = self.encode_prompt(prompt)
        negative = self.encode_prompt(negative_prompt or "") if guidance_scale > 1.0 else None
        final = self.denoise(conditioning, positive, negative, guidance_scale, callback, cache=cache)
        return GenerationResult(frames=self.decode(final), latents=final.cpu(), cache_stats=self.last_cache_stats)

    def generate_long(self, prompt, negative_prompt="", *, height, width, num_frames, chunk_frames=49,
                      overlap_frames=4, mode="continue", num_inference_steps=50, guidance_scale=6.0, sampler="DDIM",
                      seed=43, start_image=None, end_image=None, control_video=None, chunk_latents=None,
                      chunk_reference_noise=None, callback=None):
        """A video longer than one clip, chunk by chunk ("continue", InP) or with context windows ("windows").

        `prompt` may be a list (one per chunk/window; the last repeats). Returns a `LongVideoResult`
        (`.frames` [F,H,W,3], `.chunk_latents`); see long_video.py for the algorithm and the noise order.
        """
        from .long_video import generate_long

        return generate_long(self, prompt, negative_prompt, height=height, width=width, num_frames=num_frames,
                             chunk_frames=chunk_frames, overlap_frames=overlap_frames, mode=mode,
                             num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                             sampler=sampler, seed=seed, start_image=start_image, end_image=end_image,
                             control_video=control_video, chunk_latents=chunk_latents,
                             chunk_reference_noise=chunk_reference_noise, callback=callback)


def call_transformer(transformer, model_in: torch.Tensor, timestep: torch.Tensor, text: PromptEmbeds,
                     inpaint: Optional[torch.Tensor], control: Optional[torch.Tensor]) -> torch.Tensor:
    """One transformer call of a denoising step: the default `model_fn` of `Pipeline.denoise`."""
    return transformer(model_in, timestep, text.bert, text.t5, inpaint_latents=inpaint, control_latents=control)


def _accepts(fn, name: str) -> bool:
    return name in inspect.signature(fn).parameters
