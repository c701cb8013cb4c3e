"""Nodes that hand EasyAnimate to ComfyUI's own sampling: MODEL, CONDITIONING, concat conditioning."""
from __future__ import annotations

import torch
from comfy_api.latest import io

from ...easyanimate_core import DEFAULT_NEGATIVE_PROMPT, round_frames
from ...easyanimate_core.buckets import latent_frames
from ...easyanimate_core.latent_rgb import fit_latent_rgb_factors
from ...easyanimate_core.pipeline import Pipeline
from ..comfy_bridge import compute_device, log
from ..conditioning import (LATENT_CHANNELS, MAX_FRAMES, _size_inputs, prompt_inputs, target_size, ui_text,
                            usable_frames)
from ..types import ModelType, TextEncodersType
from .model import (CONTROL_KEY, INPAINT_KEY, LORAS_OPTION, T5_KEY, EasyAnimateModelPatcher, build_base_model,
                    unload_patcher)

CATEGORY = "EasyAnimate/ComfyUI sampling"
MAX_SEED = 0xFFFFFFFFFFFFFFFF


def native_model(model) -> "EasyAnimateModelPatcher":
    """A ComfyUI MODEL (a ModelPatcher clone) over the loaded transformer of an EasyAnimate model.

    The BaseModel is made once per loaded folder and its patcher becomes the transformer's patcher for
    the EasyAnimate nodes too, so the memory manager sees one model. Each MODEL carries the hook LoRAs
    of the EasyAnimate LoRA nodes it was made from.
    """
    managed = model.module
    if getattr(managed, "native_base", None) is None:
        with model.vae.module.in_use():
            factors, bias = fit_latent_rgb_factors(model.vae.vae, model.vae.module.device)
        base = build_base_model(model.transformer, model.kind, model.scheduler_config, model.vae.vae.scaling_factor,
                                factors, bias)
        old = managed.patcher
        unload_patcher(old)
        managed.patcher = EasyAnimateModelPatcher(base, load_device=old.load_device, offload_device=old.offload_device)
        managed.native_base = base
        log.info("EasyAnimate: %s is now also a ComfyUI MODEL (%s, latent→RGB preview factors fitted to its VAE)",
                 model.name, model.kind)
    patcher = managed.patcher.clone()
    patcher.model_options[LORAS_OPTION] = tuple(model.loras)
    return patcher


def with_values(conditioning, values: dict):
    """A copy of a CONDITIONING list with `values` added to every entry's options."""
    return [[tensor, {**options, **values}] for tensor, options in conditioning]


class ToComfyModel(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EasyAnimateToComfyModel",
            display_name="EasyAnimate To ComfyUI Model",
            category=CATEGORY,
            description="The loaded EasyAnimate transformer as a ComfyUI MODEL, for KSampler, SamplerCustomAdvanced, "
                        "LoraLoaderModelOnly, EasyCache, context windows, TorchCompileModel... Same weights, no copy.",
            inputs=[ModelType.Input("model", tooltip="From the EasyAnimate Model Loader (or EasyAnimate LoRA nodes, "
                                                     "whose LoRAs then apply in ComfyUI's samplers too).")],
            outputs=[io.Model.Output("comfy_model", display_name="MODEL",
                                     tooltip="V5 sampling (v-prediction, zero-terminal-SNR, 1000 steps) and latents. The "
                                             "'simple' scheduler gives the EasyAnimate Sampler's timesteps.")],
        )

    @classmethod
    def execute(cls, model) -> io.NodeOutput:
        patcher = native_model(model)
        return io.NodeOutput(patcher, ui=ui_text([f"{model.name}: {model.kind} model as a ComfyUI MODEL"]))


class TextEncodeConditioning(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EasyAnimateTextEncodeConditioning",
            display_name="EasyAnimate Text Encode (Conditioning)",
            category=CATEGORY,
            description="Encodes the prompt and the negative prompt with BERT + mT5 into ComfyUI CONDITIONING, for "
                        "KSampler and other core sampling nodes with the EasyAnimate MODEL.",
            inputs=[
                TextEncodersType.Input("text_encoders", tooltip="From the EasyAnimate Model Loader."),
                *prompt_inputs(),
            ],
            outputs=[
                io.Conditioning.Output("positive", tooltip="BERT states, with the mT5 states attached."),
                io.Conditioning.Output("negative", tooltip="The negative prompt, likewise."),
            ],
        )

    @classmethod
    def execute(cls, text_encoders, prompt: str, negative_prompt: str = DEFAULT_NEGATIVE_PROMPT) -> io.NodeOutput:
        with text_encoders.module.in_use():
            encoded = [text_encoders.encoders.encode([text]).to("cpu", torch.float32) for text in (prompt, negative_prompt)]
        return io.NodeOutput(*([[e.bert, {T5_KEY: e.t5}]] for e in encoded))


class VideoConditioningNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EasyAnimateVideoConditioning",
            display_name="EasyAnimate Video Conditioning",
            category=CATEGORY,
            description="Start/end images, a video + mask (InP models) or a control video (Control models) as "
                        "concat conditioning in positive/negative, plus the empty latent to sample: ComfyUI's "
                        "video-model convention (as its Wan image-to-video node), for KSampler.",
            inputs=[
                ModelType.Input("model", tooltip="From the EasyAnimate Model Loader: its kind decides what it takes, "
                                                 "its VAE encodes the inputs."),
                io.Conditioning.Input("positive", tooltip="From EasyAnimate Text Encode (Conditioning)."),
                io.Conditioning.Input("negative", tooltip="From EasyAnimate Text Encode (Conditioning)."),
                io.Int.Input("length", default=49, min=1, max=MAX_FRAMES, step=4,
                             tooltip="Frames to make (4k+1); a video or control video limits it to its own length."),
                *_size_inputs(),
                io.Int.Input("seed", default=43, min=0, max=MAX_SEED,
                             tooltip="Seed of the InP models' reference-noise augmentation; the KSampler's seed gives "
                                     "exactly the EasyAnimate Sampler's conditioning."),
                io.Image.Input("start_image", optional=True, tooltip="First frame (InP models)."),
                io.Image.Input("end_image", optional=True, tooltip="Last frame (InP models)."),
                io.Image.Input("video", optional=True, tooltip="A video to edit where `mask` is white (InP models)."),
                io.Mask.Input("mask", optional=True, tooltip="With `video`: 1 (white) = regenerate, 0 = keep."),
                io.Image.Input("control_video", optional=True,
                               tooltip="Processed control frames: pose, Canny, depth... (Control models)."),
            ],
            outputs=[
                io.Conditioning.Output("positive_out", display_name="positive", tooltip="With the concat latents."),
                io.Conditioning.Output("negative_out", display_name="negative", tooltip="With the concat latents."),
                io.Latent.Output("latent", tooltip="An empty latent of the output size and length, for KSampler."),
            ],
        )

    @classmethod
    def execute(cls, model, positive, negative, length: int, size: str, width: int, height: int, seed: int = 43,
                start_image=None, end_image=None, video=None, mask=None, control_video=None) -> io.NodeOutput:
        notes = []
        reference = next((x for x in (start_image, video, control_video) if x is not None), None)
        w, h = target_size(size, width, height, reference, notes)
        frames = round_frames(length)
        for name, given in (("video", video), ("control_video", control_video)):
            if given is not None:
                frames = min(frames, usable_frames(given, name, notes))
        inputs = {"start_image": None if start_image is None else start_image[0].cpu(),
                  "end_image": None if end_image is None else end_image[-1].cpu(),
                  "video": None if video is None else video[:frames].cpu(),
                  "mask": None if mask is None else (mask if mask.dim() == 3 else mask[None])[:frames].cpu(),
                  "control_video": None if control_video is None else control_video[:frames].cpu()}
        pipe = Pipeline(transformer=model.transformer, vae=model.vae.vae, text_encoders=None,
                        scheduler_config=model.scheduler_config, kind=model.kind,
                        add_noise_in_inpaint_model=model.add_noise_in_inpaint_model, device=compute_device(),
                        dtype=model.dtype)
        pipe.check_request(**inputs)
        with model.vae.module.in_use():
            prepared = pipe.prepare(height=h, width=w, num_frames=frames, num_inference_steps=1, seed=seed, **inputs)
        values = {}
        if prepared.inpaint_latents is not None and any(v is not None for v in inputs.values()):
            values[INPAINT_KEY] = prepared.inpaint_latents.float().cpu()
        if prepared.control_latents is not None:
            values[CONTROL_KEY] = prepared.control_latents.float().cpu()
        latent = {"samples": torch.zeros(1, LATENT_CHANNELS, latent_frames(prepared.num_frames), h // 8, w // 8)}
        notes.insert(0, f"{prepared.num_frames} frames at {w}x{h}; "
                        f"{', '.join(k for k, v in inputs.items() if v is not None) or 'text only'}")
        return io.NodeOutput(with_values(positive, values), with_values(negative, values), latent,
                             ui=ui_text(notes))
