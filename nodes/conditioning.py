"""Text encoding, latents and image/video/control conditioning nodes."""
from __future__ import annotations

import torch
from comfy_api.latest import io

from ..easyanimate_core import DEFAULT_NEGATIVE_PROMPT, bucket_size, round_frames
from ..easyanimate_core.buckets import BASE_RESOLUTIONS, floor_to_multiple, latent_frames
from ..easyanimate_core.control import canny_frames
from ..easyanimate_core.errors import UnsupportedRequestError
from ..easyanimate_core.vae_io import encode_frames
from .inputs import check_image_size, image_input, report
from .types import (TextConditioning, TextConditioningType, TextEncodersType, VaeType, VideoConditioning,
                    VideoConditioningType)

CATEGORY = "EasyAnimate"
LATENT_CHANNELS = 16
SIZE_MODES = tuple(f"bucket {base}" for base in BASE_RESOLUTIONS) + ("explicit",)
MAX_SIDE = 2048
MAX_FRAMES = 161


def ui_text(lines) -> dict:
    return {"text": ("\n".join(lines),)} if lines else None


def empty_latent(width: int, height: int, length: int) -> dict:
    return {"samples": torch.zeros(1, LATENT_CHANNELS, latent_frames(length), height // 8, width // 8)}


def check_choice(name: str, value: str, options) -> None:
    """Combo values of schema nodes are not validated by ComfyUI 0.3.75: do it here."""
    if value not in options:
        raise UnsupportedRequestError(f"{name} must be one of {', '.join(map(str, options))}; got {value!r}")


def target_size(size: str, width: int, height: int, image: torch.Tensor | None, notes: list) -> tuple[int, int]:
    """(width, height): the bucket nearest the image's aspect ratio, or the explicit size in multiples of 16."""
    check_choice("size", size, SIZE_MODES)
    if size != "explicit":
        if image is None:
            raise UnsupportedRequestError("a bucket size needs an image to take the aspect ratio from")
        h, w = bucket_size(image.shape[1], image.shape[2], int(size.split()[1]))
        notes.append(f"size {w}x{h} ({size}, nearest to the input's {image.shape[2]}x{image.shape[1]})")
        return w, h
    w, h = floor_to_multiple(width), floor_to_multiple(height)
    if w < 16 or h < 16:
        raise UnsupportedRequestError(f"width and height must be at least 16; got {width}x{height}")
    if (w, h) != (width, height):
        notes.append(f"size {width}x{height} is not a multiple of 16: using {w}x{h}")
    return w, h


def usable_frames(frames: torch.Tensor, what: str, notes: list) -> int:
    """Frames of a video the model can take (4k+1, at most MAX_FRAMES), with a note when some are dropped."""
    count = frames.shape[0]
    usable = round_frames(min(count, MAX_FRAMES))
    if usable == 1 and count > 1:
        notes.append(f"{what} has {count} frames; EasyAnimate takes 4k+1 frames, so only its first frame is used "
                     "and the result is a single frame. Give at least 5 frames for a video")
    elif usable != count:
        notes.append(f"{what} has {count} frames; EasyAnimate takes 4k+1 frames, so the first {usable} are used")
    return usable


def length_frames(length: int, notes: list) -> int:
    """The 4k+1 frame count for a `length` input, with a note when it changes."""
    frames = round_frames(length)
    if frames != length:
        extra = " (a single frame, i.e. an image; 5 is the shortest video)" if frames == 1 else ""
        notes.append(f"length {length} is not 4k+1: using {frames}{extra}")
    return frames


def _size_inputs():
    return [
        io.Combo.Input("size", options=list(SIZE_MODES), default="bucket 512",
                       tooltip="Output size: the training bucket nearest to the input's aspect ratio at a base "
                               "resolution (512 is the official default), or the width/height below."),
        io.Int.Input("width", default=672, min=16, max=MAX_SIDE, step=16,
                     tooltip="Output width when size is 'explicit' (multiple of 16)."),
        io.Int.Input("height", default=384, min=16, max=MAX_SIDE, step=16,
                     tooltip="Output height when size is 'explicit' (multiple of 16)."),
    ]


def prompt_inputs():
    """The prompt and negative prompt inputs of both text encode nodes."""
    return [
        io.String.Input("prompt", multiline=True, default="",
                        tooltip="What the video shows. English or Chinese; up to 256 mT5 tokens are used."),
        io.String.Input("negative_prompt", multiline=True, default=DEFAULT_NEGATIVE_PROMPT,
                        tooltip="What to avoid. The default is the official one (distorted bodies, "
                                "subtitles, comics, static, ugly, errors, garbled text)."),
    ]


class TextEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EasyAnimateTextEncode",
            display_name="EasyAnimate Text Encode",
            category=CATEGORY,
            description="Encodes the prompt and the negative prompt with BERT + mT5.",
            inputs=[
                TextEncodersType.Input("text_encoders", tooltip="From the EasyAnimate Model Loader."),
                *prompt_inputs(),
            ],
            outputs=[
                TextConditioningType.Output("positive", tooltip="The encoded prompt."),
                TextConditioningType.Output("negative", tooltip="The encoded negative prompt."),
            ],
        )

    @classmethod
    def execute(cls, text_encoders, prompt: str, negative_prompt: str = DEFAULT_NEGATIVE_PROMPT) -> io.NodeOutput:
        with text_encoders.module.in_use():
            encoded = [TextConditioning(text_encoders.encoders.encode([text]).to("cpu", torch.float32), text)
                       for text in (prompt, negative_prompt)]
        return io.NodeOutput(*encoded)


class EmptyLatent(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EasyAnimateEmptyLatent",
            display_name="EasyAnimate Empty Video Latent",
            category=CATEGORY,
            description="An empty video latent for text-to-video: the size and length of the video to make.",
            inputs=[
                io.Int.Input("width", default=672, min=16, max=MAX_SIDE, step=16, tooltip="Video width in pixels."),
                io.Int.Input("height", default=384, min=16, max=MAX_SIDE, step=16, tooltip="Video height in pixels."),
                io.Int.Input("length", default=49, min=1, max=MAX_FRAMES, step=4,
                             tooltip="Frames (4k+1: 1 makes an image, 49 is the trained length)."),
            ],
            outputs=[io.Latent.Output("latent", tooltip="Zeros of shape [1,16,(length-1)/4+1,height/8,width/8].")],
        )

    @classmethod
    def execute(cls, width: int, height: int, length: int) -> io.NodeOutput:
        notes = []
        w, h = target_size("explicit", width, height, None, notes)
        frames = length_frames(length, notes)
        return io.NodeOutput(empty_latent(w, h, frames), ui=report("Empty Video Latent", notes))


class ImageToVideo(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EasyAnimateImageToVideo",
            display_name="EasyAnimate Image to Video",
            category=CATEGORY,
            description="Start frame (and optionally last frame) for an InP model.",
            inputs=[
                VaeType.Input("vae", tooltip="From the EasyAnimate Model Loader."),
                io.Image.Input("start_image", tooltip="The first frame of the video."),
                io.Int.Input("length", default=49, min=1, max=MAX_FRAMES, step=4,
                             tooltip="Frames to make (4k+1)."),
                *_size_inputs(),
                io.Image.Input("end_image", optional=True,
                               tooltip="Optional last frame. A different size from the start image is resized "
                                       "to the output size."),
            ],
            outputs=[
                VideoConditioningType.Output("conditioning", tooltip="For the sampler's video_conditioning input."),
                io.Latent.Output("latent", tooltip="An empty latent of the output size and length."),
            ],
        )

    @classmethod
    def execute(cls, vae, start_image, length: int, size: str, width: int, height: int,
                end_image=None) -> io.NodeOutput:
        notes = []
        start_image = image_input(start_image, "start_image", notes)
        w, h = target_size(size, width, height, start_image, notes)
        frames = length_frames(length, notes)
        if start_image.shape[0] > 1:
            notes.append(f"start_image is a batch of {start_image.shape[0]}: its first image is used")
        if end_image is not None:
            end_image = image_input(end_image, "end_image", notes)
            if end_image.shape[0] > 1:
                notes.append(f"end_image is a batch of {end_image.shape[0]}: its last image is used")
            if tuple(end_image.shape[1:3]) != tuple(start_image.shape[1:3]):
                notes.append(f"end_image is {end_image.shape[2]}x{end_image.shape[1]}, the start image "
                             f"{start_image.shape[2]}x{start_image.shape[1]}: both are resized to {w}x{h}")
            end_image = end_image[-1].cpu()
        cond = VideoConditioning(vae=vae, start_image=start_image[0].cpu(), end_image=end_image, notes=tuple(notes))
        return io.NodeOutput(cond, empty_latent(w, h, frames), ui=report("Image to Video", notes))


class VideoInpaint(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EasyAnimateVideoInpaint",
            display_name="EasyAnimate Video Inpaint",
            category=CATEGORY,
            description="Region editing (InP model): regenerate where the mask is white, keep the rest of the "
                        "input video. With denoise < 1 in the sampler the whole video is also redrawn "
                        "(video to video).",
            inputs=[
                VaeType.Input("vae", tooltip="From the EasyAnimate Model Loader."),
                io.Image.Input("video", tooltip="The input frames (4k+1; extra frames are dropped)."),
                io.Mask.Input("mask", tooltip="1 (white) = regenerate, 0 = keep. One mask for all frames, or "
                                              "one per frame."),
                *_size_inputs(),
            ],
            outputs=[
                VideoConditioningType.Output("conditioning", tooltip="For the sampler's video_conditioning input."),
                io.Latent.Output("latent", tooltip="The encoded input video (the start for denoise < 1)."),
            ],
        )

    @classmethod
    def execute(cls, vae, video, mask, size: str, width: int, height: int) -> io.NodeOutput:
        notes = []
        video = image_input(video, "video", notes)
        w, h = target_size(size, width, height, video, notes)
        frames = usable_frames(video, "video", notes)
        mask = mask_frames(mask, video, frames, notes)
        video = video[:frames].cpu()
        cond = VideoConditioning(vae=vae, video=video, mask=mask.cpu(), notes=tuple(notes))
        return io.NodeOutput(cond, encode_video_latent(vae, video, w, h), ui=report("Video Inpaint", notes))


def mask_frames(mask: torch.Tensor, video: torch.Tensor, frames: int, notes: list) -> torch.Tensor:
    """The MASK for the first `frames` frames of `video`: one mask for all frames, or one per frame."""
    if mask.dim() == 2:
        mask = mask.unsqueeze(0)
    if mask.dim() != 3:
        raise UnsupportedRequestError(f"mask must be a MASK batch [masks, height, width]; got shape {list(mask.shape)}")
    count = mask.shape[0]
    if count != 1 and count < frames:
        raise UnsupportedRequestError(
            f"mask holds {count} masks but {frames} frames of the video are used: give one mask (used for every "
            f"frame) or one per frame, at least {frames} (e.g. a mask video of the same length through Convert "
            "Image to Mask)")
    if count > frames:
        notes.append(f"mask holds {count} masks; the first {frames} are used, one per frame")
    if tuple(mask.shape[1:]) != tuple(video.shape[1:3]):
        notes.append(f"mask is {mask.shape[2]}x{mask.shape[1]}, the video {video.shape[2]}x{video.shape[1]}: "
                     "the mask is stretched to the output size")
    return mask[:frames]


def encode_video_latent(vae, frames: torch.Tensor, width: int, height: int) -> dict:
    """LATENT of a video: samples = the posterior mean, unscaled (ComfyUI's convention: samplers apply the latent
    format's 0.7125); the posterior rides along for the EasyAnimate Sampler's video to video."""
    with vae.module.in_use():
        posterior = encode_frames(vae.vae, frames, height, width, vae.module.device)
        mean, std = posterior.mean.float().cpu(), posterior.std.float().cpu()
    return {"samples": mean, "easyanimate_posterior": (mean, std)}


class ControlVideo(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EasyAnimateControlVideo",
            display_name="EasyAnimate Control Video",
            category=CATEGORY,
            description="A processed control video (pose, Canny, depth, scribble, MLSD, HED, anime) for a "
                        "Control model.",
            inputs=[
                VaeType.Input("vae", tooltip="From the EasyAnimate Model Loader."),
                io.Image.Input("control_video", tooltip="Control frames, already processed (e.g. by EasyAnimate "
                                                        "Canny Edges or a pose estimator)."),
                *_size_inputs(),
            ],
            outputs=[
                VideoConditioningType.Output("conditioning", tooltip="For the sampler's video_conditioning input."),
                io.Latent.Output("latent", tooltip="An empty latent of the output size and length."),
            ],
        )

    @classmethod
    def execute(cls, vae, control_video, size: str, width: int, height: int) -> io.NodeOutput:
        notes = []
        control_video = image_input(control_video, "control_video", notes)
        w, h = target_size(size, width, height, control_video, notes)
        frames = usable_frames(control_video, "control_video", notes)
        cond = VideoConditioning(vae=vae, control_video=control_video[:frames].cpu(), notes=tuple(notes))
        return io.NodeOutput(cond, empty_latent(w, h, frames), ui=report("Control Video", notes))


class ResolutionBucket(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EasyAnimateResolutionBucket",
            display_name="EasyAnimate Resolution Bucket",
            category=CATEGORY,
            description="The trained resolution nearest to an image's aspect ratio, at a base resolution.",
            inputs=[
                io.Image.Input("image", tooltip="The image (or first frame) whose aspect ratio to match."),
                io.Combo.Input("base_resolution", options=[str(b) for b in BASE_RESOLUTIONS], default="512",
                               tooltip="512 runs on small GPUs; 768/960/1024 need more memory and time."),
            ],
            outputs=[io.Int.Output("width"), io.Int.Output("height")],
        )

    @classmethod
    def execute(cls, image, base_resolution: str = "512") -> io.NodeOutput:
        check_choice("base_resolution", base_resolution, [str(b) for b in BASE_RESOLUTIONS])
        check_image_size(image, "image")
        h, w = bucket_size(image.shape[1], image.shape[2], int(base_resolution))
        return io.NodeOutput(w, h, ui=ui_text([f"{w}x{h}"]))


class CannyEdges(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EasyAnimateCannyEdges",
            display_name="EasyAnimate Canny Edges",
            category=CATEGORY,
            description="Canny edge frames (OpenCV) from a video, for a Control model.",
            inputs=[
                io.Image.Input("images", tooltip="Video frames."),
                io.Int.Input("low_threshold", default=100, min=0, max=255,
                             tooltip="Edges weaker than this are dropped."),
                io.Int.Input("high_threshold", default=200, min=0, max=255,
                             tooltip="Edges stronger than this always count."),
            ],
            outputs=[io.Image.Output("edges", tooltip="White edges on black, same size and count as the input.")],
        )

    @classmethod
    def execute(cls, images, low_threshold: int = 100, high_threshold: int = 200) -> io.NodeOutput:
        return io.NodeOutput(canny_frames(images, low_threshold, high_threshold).to(images.device))
