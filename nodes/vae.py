"""VAE decode (latent → frames) and encode (frames → latent) nodes."""
from __future__ import annotations

import torch
from comfy_api.latest import io

from ..easyanimate_core.vae_io import decode_latents
from .comfy_bridge import check_interrupted, to_output_images
from .conditioning import CATEGORY, SIZE_MODES, check_choice, encode_video_latent, target_size, usable_frames
from .inputs import image_input, report
from .sampling import latent_geometry
from .types import VaeType

ENCODE_SIZES = ("input",) + tuple(mode for mode in SIZE_MODES if mode != "explicit")


class VAEDecode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EasyAnimateVAEDecode",
            display_name="EasyAnimate VAE Decode",
            category=CATEGORY,
            description="Decodes a video latent into frames (an IMAGE batch, one row per frame).",
            inputs=[
                VaeType.Input("vae", tooltip="From the EasyAnimate Model Loader."),
                io.Latent.Input("samples", tooltip="From the EasyAnimate Sampler, or KSampler with the EasyAnimate MODEL."),
                io.Boolean.Input("tiling", default=False,
                                 tooltip="Decode in overlapping spatial tiles: bounded memory for large frames, "
                                         "blended seams. Frames are always decoded in causal chunks."),
                io.Int.Input("tile_size", default=384, min=128, max=1024, step=32,
                             tooltip="Tile size in pixels when tiling is on."),
            ],
            outputs=[io.Image.Output("images", tooltip="Frames, float 0..1, for VHS Video Combine or "
                                                       "Create Video.")],
        )

    @classmethod
    def execute(cls, vae, samples, tiling: bool = False, tile_size: int = 384) -> io.NodeOutput:
        latent_geometry(samples, "samples")
        check_interrupted()
        module = vae.vae
        saved = (module.use_tiling, module.tile_sample_min_size, module.tile_overlap_factor)
        with vae.module.in_use():
            try:
                if tiling:
                    module.enable_tiling(tile_size)
                else:
                    module.disable_tiling()
                # LATENT samples are unscaled (ComfyUI's convention); decode_latents takes scaled ones
                frames = decode_latents(module, samples["samples"] * module.scaling_factor, vae.module.device)
            finally:
                module.use_tiling, module.tile_sample_min_size, module.tile_overlap_factor = saved
        return io.NodeOutput(to_output_images(frames))


class VAEEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EasyAnimateVAEEncode",
            display_name="EasyAnimate VAE Encode",
            category=CATEGORY,
            description="Encodes frames into a video latent, e.g. for video to video (sampler denoise < 1).",
            inputs=[
                VaeType.Input("vae", tooltip="From the EasyAnimate Model Loader."),
                io.Image.Input("pixels", tooltip="Video frames (4k+1; extra frames are dropped)."),
                io.Combo.Input("size", options=list(ENCODE_SIZES), default="input",
                               tooltip="input: the frames' own size floored to multiples of 16; bucket: the "
                                       "training bucket nearest to their aspect ratio."),
            ],
            outputs=[io.Latent.Output("latent", tooltip="The encoded video (posterior mean; the sampler also "
                                                         "uses its spread for video to video).")],
        )

    @classmethod
    def execute(cls, vae, pixels: torch.Tensor, size: str = "input") -> io.NodeOutput:
        check_choice("size", size, ENCODE_SIZES)
        notes = []
        pixels = image_input(pixels, "pixels", notes)
        mode = "explicit" if size == "input" else size
        w, h = target_size(mode, pixels.shape[2], pixels.shape[1], pixels, notes)
        frames = usable_frames(pixels, "pixels", notes)
        return io.NodeOutput(encode_video_latent(vae, pixels[:frames].cpu(), w, h), ui=report("VAE Encode", notes))
