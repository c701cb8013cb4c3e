"""The long-video node: chunked continuation or sliding context windows, frames out."""
from __future__ import annotations

import torch
from comfy_api.latest import io

from ..easyanimate_core import SAMPLER_NAMES
from ..easyanimate_core.context_windows import FUSE_METHODS
from ..easyanimate_core.errors import UnsupportedRequestError
from ..easyanimate_core.long_video import MODES, generate_long, plan_chunks
from ..easyanimate_core.lora import set_loras
from ..easyanimate_core.pipeline import KIND_NAMES, Pipeline
from ..easyanimate_core.samplers import DEFAULT_SAMPLER
from .comfy_bridge import SamplingProgress, check_interrupted, compute_device, previews_enabled, to_output_images
from .conditioning import CATEGORY, MAX_SIDE, SIZE_MODES, check_choice, target_size, ui_text
from .sampling import MAX_SEED, _preview_decoder
from .types import ModelType, TextConditioningType, TextEncodersType, VaeType

MAX_LONG_FRAMES = 4097
MAX_CHUNK_FRAMES = 161


def chunk_prompt_lines(text: str) -> list[str]:
    """One prompt per non-empty line."""
    return [line.strip() for line in (text or "").splitlines() if line.strip()]


class LongVideoSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EasyAnimateLongVideoSampler",
            display_name="EasyAnimate Long Video Sampler",
            category=CATEGORY,
            description="Videos longer than one clip. continue (InP models): chunk after chunk, each starting "
                        "from the last frames of the one before, as the original EasyAnimate does. windows (any "
                        "model, e.g. Control with a long pose video): the whole video denoised at once through "
                        "overlapping windows of the chunk length.",
            inputs=[
                ModelType.Input("model", tooltip="From the EasyAnimate Model Loader (or a LoRA loader). continue "
                                                 "needs an InP model; windows works with every model."),
                VaeType.Input("vae", tooltip="From the EasyAnimate Model Loader: decodes each chunk (continue) "
                                             "or the whole video (windows)."),
                TextConditioningType.Input("positive", tooltip="From EasyAnimate Text Encode; used for every chunk "
                                                               "unless chunk_prompts is filled in."),
                TextConditioningType.Input("negative", tooltip="From EasyAnimate Text Encode (unused at cfg 1)."),
                io.Combo.Input("mode", options=list(MODES), default="continue",
                               tooltip="continue: the original's chunked continuation (InP models; the overlap "
                                       "frames are handed over and cross-faded). windows: sliding context windows "
                                       "over the whole latent at every step (T2V, InP and Control models)."),
                io.Int.Input("total_frames", default=145, min=5, max=MAX_LONG_FRAMES,
                             tooltip="Length of the video. continue rounds the last chunk down to 4k+1 frames as "
                                     "the original does (145 with chunk 49 / overlap 4 gives 144); windows uses "
                                     "4k+1 frames and at most the control video's length."),
                io.Int.Input("chunk_frames", default=49, min=5, max=MAX_CHUNK_FRAMES, step=4,
                             tooltip="Frames per chunk or window (4k+1; 49 is the trained length)."),
                io.Int.Input("overlap_frames", default=4, min=1, max=MAX_CHUNK_FRAMES - 1,
                             tooltip="continue: frames handed from one chunk to the next and cross-faded (the "
                                     "original's default is 4; the model was trained with 1-4 known frames). "
                                     "windows: frames shared by neighbouring windows (4 frames per latent frame, "
                                     "at least one latent frame; 16 blends more smoothly)."),
                io.Combo.Input("size", options=list(SIZE_MODES), default="explicit",
                               tooltip="explicit: the width/height below. bucket: the training bucket nearest to the "
                                       "start image's (or first control frame's) aspect ratio."),
                io.Int.Input("width", default=672, min=16, max=MAX_SIDE, step=16,
                             tooltip="Video width when size is 'explicit' (multiple of 16)."),
                io.Int.Input("height", default=384, min=16, max=MAX_SIDE, step=16,
                             tooltip="Video height when size is 'explicit' (multiple of 16)."),
                io.Int.Input("seed", default=43, min=0, max=MAX_SEED, control_after_generate=True,
                             tooltip="Noise seed; the same seed and settings give the same video as the CLI and "
                                     "pipe.generate_long."),
                io.Int.Input("steps", default=50, min=1, max=200,
                             tooltip="Denoising steps per chunk (50 is the official default; PNDM needs at least 4)."),
                io.Float.Input("cfg", default=6.0, min=1.0, max=20.0, step=0.1, round=0.01,
                               tooltip="Classifier-free guidance scale; 1 disables the negative prompt."),
                io.Combo.Input("sampler_name", options=list(SAMPLER_NAMES), default=DEFAULT_SAMPLER,
                               tooltip="The scheduler (diffusers): DDIM is the official default."),
                io.Combo.Input("fuse", options=list(FUSE_METHODS), default="linear",
                               tooltip="windows only: how overlapping window predictions are mixed. linear: a "
                                       "cross-fade over the shared frames; pyramid: each window weighted highest in "
                                       "its middle."),
                io.Image.Input("start_image", optional=True,
                               tooltip="First frame of the video (InP models)."),
                io.Image.Input("end_image", optional=True,
                               tooltip="Last frame of the video (InP models; continue gives it to the last chunk)."),
                io.Image.Input("control_frames", optional=True,
                               tooltip="Processed control video (pose, Canny, depth...) for a Control model in "
                                       "windows mode; as long as the video you want."),
                TextEncodersType.Input("text_encoders", optional=True,
                                       tooltip="From the Model Loader: needed only to encode chunk_prompts."),
                io.String.Input("chunk_prompts", optional=True, multiline=True, default="",
                                tooltip="Optional: one prompt per line, one line per chunk (windows: per window); "
                                        "the last line repeats. Empty: positive is used throughout."),
            ],
            outputs=[io.Image.Output("images", tooltip="All frames, float 0..1, for VHS Video Combine or "
                                                       "Create Video.")],
        )

    @classmethod
    def execute(cls, model, vae, positive, negative, mode: str, total_frames: int, chunk_frames: int,
                overlap_frames: int, size: str, width: int, height: int, seed: int, steps: int, cfg: float,
                sampler_name: str, fuse: str, start_image=None, end_image=None, control_frames=None,
                text_encoders=None, chunk_prompts: str = "") -> io.NodeOutput:
        check_choice("mode", mode, MODES)
        check_choice("sampler_name", sampler_name, SAMPLER_NAMES)
        check_choice("fuse", fuse, FUSE_METHODS)
        notes = []
        reference = start_image if start_image is not None else control_frames
        width, height = target_size(size, width, height, reference, notes)
        prompt = positive.embeds
        lines = chunk_prompt_lines(chunk_prompts)
        if lines:
            if text_encoders is None:
                raise UnsupportedRequestError("chunk_prompts needs the text_encoders input: connect the Model "
                                              "Loader's text_encoders output, or clear chunk_prompts")
            with text_encoders.module.in_use():
                prompt = [text_encoders.encoders.encode([line]).to("cpu", torch.float32) for line in lines]
        pipe = Pipeline(transformer=model.transformer, vae=vae.vae, text_encoders=None,
                        scheduler_config=model.scheduler_config, kind=model.kind,
                        add_noise_in_inpaint_model=model.add_noise_in_inpaint_model, device=compute_device(),
                        dtype=model.dtype)
        parts = len(plan_chunks(total_frames, chunk_frames, overlap_frames)[0]) if mode == "continue" else 1
        check_interrupted()

        preview = previews_enabled()
        extra_preview_vae = preview and model.vae.module is not vae.module
        model.module.load(vae.module, *((model.vae.module,) if extra_preview_vae else ()))
        lora_report = set_loras(model.transformer, list(model.loras))
        progress = SamplingProgress(parts * steps, _preview_decoder(model) if preview else None)
        try:
            result = generate_long(
                pipe, prompt, negative.embeds if cfg > 1.0 else None, height=height, width=width,
                num_frames=total_frames, chunk_frames=chunk_frames, overlap_frames=overlap_frames, mode=mode,
                num_inference_steps=steps, guidance_scale=cfg, sampler=sampler_name, seed=seed,
                start_image=_first(start_image), end_image=_first(end_image),
                control_video=None if control_frames is None else control_frames.cpu(), callback=progress,
                fuse=fuse, on_chunk=lambda index, count: check_interrupted())
        finally:
            vae.module.release()
            if extra_preview_vae:
                model.vae.module.release()
            model.module.release()

        frames = result.frames
        notes.insert(0, f"{KIND_NAMES[model.kind]}: {result.describe()} at {width}x{height}, {steps} steps "
                        f"{sampler_name} each, cfg {cfg:g}, seed {seed}")
        if lines:
            notes.append(f"{len(lines)} chunk prompt{'s' if len(lines) != 1 else ''}"
                         + (" (the last repeats)" if mode == "continue" and len(lines) < len(result.chunks) else ""))
        notes.extend(result.notes)
        if model.loras:
            notes.append("LoRA: " + lora_report.summary().replace("\n", "; "))
        return io.NodeOutput(to_output_images(frames), ui=ui_text(notes))


def _first(image):
    """A ComfyUI IMAGE batch → its first frame [H,W,3] on the CPU (None stays None)."""
    return None if image is None else image[0].cpu()
