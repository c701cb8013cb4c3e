"""The sampler node: text + latent (+ image/video/control conditioning) → denoised video latent."""
from __future__ import annotations

import math
from contextlib import nullcontext

from comfy_api.latest import io

from ..easyanimate_core import SAMPLER_NAMES
from ..easyanimate_core.errors import UnsupportedRequestError
from ..easyanimate_core.lora import set_loras
from ..easyanimate_core.models.vae import DiagonalGaussian
from ..easyanimate_core.pipeline import KIND_NAMES, Pipeline
from ..easyanimate_core.samplers import DEFAULT_SAMPLER, MIN_STEPS
from .cache import CacheType
from .comfy_bridge import SamplingProgress, check_interrupted, compute_device, previews_enabled
from .conditioning import CATEGORY, LATENT_CHANNELS, check_choice, ui_text
from .inputs import report
from .types import ModelType, TextConditioningType, VideoConditioningType

MAX_SEED = 0xFFFFFFFFFFFFFFFF


def latent_geometry(latent: dict, name: str = "latent_image") -> tuple[int, int, int]:
    """(height, width, frames) in pixels of an EasyAnimate video latent given to the input `name`."""
    samples = latent.get("samples") if isinstance(latent, dict) else None
    if samples is None or samples.dim() != 5 or samples.shape[1] != LATENT_CHANNELS:
        shape = None if samples is None else list(samples.shape)
        raise UnsupportedRequestError(
            f"{name} must be an EasyAnimate video latent [1,16,frames,height/8,width/8]; got {shape}. Use "
            "EasyAnimate Empty Video Latent, Image to Video, Video Inpaint, Control Video or VAE Encode.")
    if samples.shape[0] != 1:
        raise UnsupportedRequestError(f"{name} holds a batch of {samples.shape[0]} videos; give one at a time")
    _, _, t, h, w = samples.shape
    return h * 8, w * 8, (t - 1) * 4 + 1


def check_steps_input(sampler_name: str, steps: int, denoise: float) -> None:
    """steps must suit sampler_name, and denoise × steps leave at least one step (said with this node's input
    names; the core says 'strength' and 'step count')."""
    minimum = MIN_STEPS.get(sampler_name, 1)
    if steps < minimum:
        others = ", ".join(name for name in SAMPLER_NAMES if name not in MIN_STEPS)
        raise UnsupportedRequestError(f"sampler_name {sampler_name} needs steps of at least {minimum} (got {steps}): "
                                      f"raise steps, or pick another sampler_name ({others})")
    if denoise < 1.0 and int(steps * denoise) < 1:
        raise UnsupportedRequestError(
            f"denoise {denoise:g} × steps {steps} leaves no step to run (only the last denoise × steps steps run): "
            f"raise denoise to at least {math.ceil(100 / steps) / 100:g} or steps to at least "
            f"{math.ceil(1 / denoise)}")


def check_conditioning(kind: str, cond, frames: int, warnings: list) -> None:
    """Refusals in this node's terms: a Control model needs Control Video, and a conditioning video must
    cover the latent's length (the core would silently make the shorter video)."""
    if kind == "control" and cond is None:  # other conditioning on a Control model: the core names the model
        raise UnsupportedRequestError(
            "this is an EasyAnimate V5 Control model: connect EasyAnimate Control Video to video_conditioning (it "
            "takes pose, Canny or depth frames), or load a text-to-video or InP model for text to video")
    if cond is None:
        return
    for name in ("video", "control_video"):
        given = getattr(cond, name)
        if given is None:
            continue
        count = given.shape[0]
        if count < frames:
            raise UnsupportedRequestError(
                f"the {name} in video_conditioning has {count} usable frame{'s' * (count != 1)} but latent_image "
                f"asks for {frames}: "
                f"the video would come out {count} frames long, not {frames}. Connect the latent output of the "
                f"node that makes video_conditioning to latent_image (it has the video's length), set the length "
                f"to {count}, or give a video of at least {frames} frames")
        if count > frames:
            warnings.append(f"the {name} in video_conditioning has {count} frames and latent_image asks for "
                            f"{frames}: its first {frames} frames are used")


def start_video_posterior(latent: dict, denoise: float, device):
    """For denoise < 1: the encoded input video to start from (None when the core should encode pixels)."""
    if denoise >= 1.0:
        return None
    if "easyanimate_posterior" in latent:
        mean, std = latent["easyanimate_posterior"]
        return DiagonalGaussian.from_mean_std(mean.to(device), std.to(device))
    return None


class Sampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EasyAnimateSampler",
            display_name="EasyAnimate Sampler",
            category=CATEGORY,
            description="Generates the video latent. Text-to-video with an empty latent; image/video/control "
                        "conditioning when connected; video to video when denoise < 1 with an encoded video.",
            inputs=[
                ModelType.Input("model", tooltip="From the EasyAnimate Model Loader (or a LoRA loader)."),
                TextConditioningType.Input("positive", tooltip="From EasyAnimate Text Encode."),
                TextConditioningType.Input("negative", tooltip="From EasyAnimate Text Encode (unused at cfg 1)."),
                io.Latent.Input("latent_image", tooltip="Sets size and length: an empty latent, or an encoded video "
                                                        "for denoise < 1."),
                io.Int.Input("seed", default=43, min=0, max=MAX_SEED, control_after_generate=True,
                             tooltip="Noise seed; the same seed and settings give the same video as the CLI."),
                io.Int.Input("steps", default=50, min=1, max=200, tooltip="Denoising steps (50 is the official "
                                                                          "default; PNDM needs at least 4)."),
                io.Float.Input("cfg", default=6.0, min=1.0, max=20.0, step=0.1, round=0.01,
                               tooltip="Classifier-free guidance scale; 1 disables the negative prompt."),
                io.Combo.Input("sampler_name", options=list(SAMPLER_NAMES), default=DEFAULT_SAMPLER,
                               tooltip="The scheduler (diffusers): DDIM is the official default."),
                io.Float.Input("denoise", default=1.0, min=0.01, max=1.0, step=0.01,
                               tooltip="1 = from pure noise. Below 1 = video to video from the encoded input video "
                                       "(0.7 is the usual value): only the last denoise × steps steps run."),
                VideoConditioningType.Input("video_conditioning", optional=True,
                                            tooltip="From Image to Video, Video Inpaint (InP models) or Control "
                                                    "Video (Control models)."),
                CacheType.Input("cache", optional=True,
                                tooltip="From EasyAnimate Cache: skip transformer passes that would change little "
                                        "(faster; the node reports how many were skipped)."),
            ],
            outputs=[io.Latent.Output("latent", tooltip="The denoised video latent, for EasyAnimate VAE Decode.")],
        )

    @classmethod
    def execute(cls, model, positive, negative, latent_image, seed: int, steps: int, cfg: float,
                sampler_name: str, denoise: float, video_conditioning=None, cache=None) -> io.NodeOutput:
        check_choice("sampler_name", sampler_name, SAMPLER_NAMES)
        check_steps_input(sampler_name, steps, denoise)
        height, width, frames = latent_geometry(latent_image)
        cond = video_conditioning
        warnings = []
        check_conditioning(model.kind, cond, frames, warnings)
        vae = cond.vae if cond is not None else model.vae
        inputs = {}
        if cond is not None:
            inputs = dict(start_image=cond.start_image, end_image=cond.end_image, video=cond.video, mask=cond.mask,
                          control_video=cond.control_video)
        device = compute_device()
        posterior = start_video_posterior(latent_image, denoise, device)
        if denoise < 1.0 and posterior is None and inputs.get("video") is None:
            raise UnsupportedRequestError(
                "denoise < 1 is video to video and starts from an encoded video: connect EasyAnimate VAE Encode "
                "(or Video Inpaint) to latent_image, or set denoise to 1")

        pipe = Pipeline(transformer=model.transformer, vae=vae.vae, text_encoders=None,
                        scheduler_config=model.scheduler_config, kind=model.kind,
                        add_noise_in_inpaint_model=model.add_noise_in_inpaint_model, device=device, dtype=model.dtype,
                        model_dir=model.folder)
        pipe.check_request(**inputs, strength=denoise, video_latent_dist=posterior)
        check_interrupted()

        # Pixel inputs are encoded here (denoise < 1 without a posterior always comes with a video, see above).
        needs_vae = any(v is not None for v in inputs.values())
        with vae.module.in_use() if needs_vae else nullcontext():
            prepared = pipe.prepare(height=height, width=width, num_frames=frames, num_inference_steps=steps,
                                    sampler=sampler_name, seed=seed, strength=denoise, video_latent_dist=posterior,
                                    **inputs)

        preview = previews_enabled()
        if preview:
            model.module.load(model.vae.module)
        else:
            model.module.load()
        # After loading, so the LoRA factors are created on the compute device. The shared transformer
        # gets exactly this model's list (none for the base model) before every run.
        lora_report = set_loras(model.transformer, list(model.loras))
        progress = SamplingProgress(len(prepared.timesteps), _preview_decoder(model) if preview else None)
        try:
            final = pipe.denoise(prepared, positive.embeds, negative.embeds if cfg > 1.0 else None, cfg, progress,
                                 cache=cache)
        finally:
            if preview:
                model.vae.module.release()
            model.module.release()  # offload modes: the transformer leaves the GPU after sampling

        notes = [f"{KIND_NAMES[model.kind]}: {prepared.num_frames} frames at {prepared.width}x{prepared.height}, "
                 f"{len(prepared.timesteps)} of {steps} steps {sampler_name}, cfg {cfg:g}, seed {seed}"]
        if cond is not None:
            notes[0] += f"; conditioning: {cond.describe()}"
            notes.extend(cond.notes)
        if model.loras:
            notes.append("LoRA: " + lora_report.summary().replace("\n", "; "))
        if pipe.last_cache_stats is not None:
            notes.append(f"step cache: {pipe.last_cache_stats.describe()}")
        report("Sampler", warnings)
        # LATENT holds unscaled VAE latents, ComfyUI's convention (its samplers scale by the latent format).
        return io.NodeOutput({"samples": final.float().cpu() / vae.vae.scaling_factor},
                             ui=ui_text(notes + warnings))


def _preview_decoder(model):
    from ..easyanimate_core.vae_io import decode_latents

    vae = model.vae.vae
    return lambda latents: decode_latents(vae, latents, model.vae.module.device)
