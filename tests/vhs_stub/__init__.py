"""Test stand-in for ComfyUI-VideoHelperSuite (VHS) — NOT the real pack, and never shipped.

VideoHelperSuite is not on PyPI and cannot be installed in this offline test environment, yet every shipped
workflow (workflows/*.json) loads its video with ``VHS_LoadVideo`` and writes it with ``VHS_VideoCombine``.
This folder is a tiny custom node pack that the test server links into ``custom_nodes/ComfyUI-VideoHelperSuite``
so that the real ComfyUI frontend finds those two node types and the workflows can run end to end.

* Signatures: ``signatures.json`` is a copy of the real VHS ``/object_info`` of the two nodes
  (../shared/comfyui/object_info_vhs.json: input names, types, defaults, options, required/optional/hidden
  sections and their order, outputs, display names, category). ``tests/test_browser.py`` checks that the
  live server shows exactly those. The ``video`` combo lists the video files in input/, as VHS does.
* Behaviour (simplified, enough for tests): ``VHS_LoadVideo`` decodes the file with imageio and returns
  IMAGE frames, frame_count, audio (always None here) and a VHS-style video_info dict; it honours
  force_rate, custom_width/custom_height, frame_load_cap, skip_first_frames and select_every_nth and
  ignores ``format``. ``VHS_VideoCombine`` writes the frames with imageio into the output folder (the temp
  folder when save_output is false) as ``<prefix>_<counter:05>.<ext>``: mp4 for video/h264-mp4 and
  video/h265-mp4, webm for video/webm and video/av1-webm, gif for image/gif and video/ffmpeg-gif, webp for
  image/webp (other formats raise); it returns VHS's UI entry ``{"gifs": [...]}`` and its output
  ``(save_output, [files])``. The optional vae / meta_batch / audio sockets are declared but refused.
* ``web/vhs_stub.js`` reproduces the two parts of VHS's web extension that decide what a loaded workflow
  holds: VHS saves ``widgets_values`` as an object keyed by widget name and restores it by name (without
  that the frontend leaves every VHS widget at its default), and ``VHS_VideoCombine``'s format combo inserts
  the widgets of the chosen format (pix_fmt, crf, save_metadata, trim_to_audio for video/h264-mp4) after
  itself; they reach ``combine_video`` as keyword arguments. VHS's previews, upload button and help are
  left out.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

import folder_paths

SIGNATURES = json.loads((Path(__file__).with_name("signatures.json")).read_text(encoding="utf-8"))
VIDEO_EXTENSIONS = ("webm", "mp4", "mkv", "gif", "mov")
# VHS format → (file extension, imageio writer keyword arguments)
WRITERS = {
    "video/h264-mp4": ("mp4", {"codec": "libx264"}),
    "video/h265-mp4": ("mp4", {"codec": "libx265"}),
    "video/webm": ("webm", {"codec": "libvpx-vp9"}),
    "video/av1-webm": ("webm", {"codec": "libaom-av1"}),
    "image/gif": ("gif", {}),
    "video/ffmpeg-gif": ("gif", {}),
    "image/webp": ("webp", {}),
}


def _copy(value):
    return json.loads(json.dumps(value))


def _video_files() -> list[str]:
    folder = folder_paths.get_input_directory()
    return sorted(f for f in os.listdir(folder)
                  if os.path.isfile(os.path.join(folder, f)) and f.rsplit(".", 1)[-1].lower() in VIDEO_EXTENSIONS)


def _to_uint8(images: torch.Tensor) -> np.ndarray:
    return (images.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8).numpy()


class VideoCombine:
    """Stand-in for VHS_VideoCombine: IMAGE frames → a video file in the output folder."""

    @classmethod
    def INPUT_TYPES(cls):
        return _copy(SIGNATURES["VHS_VideoCombine"]["input"])

    RETURN_TYPES = tuple(SIGNATURES["VHS_VideoCombine"]["output"])
    RETURN_NAMES = tuple(SIGNATURES["VHS_VideoCombine"]["output_name"])
    OUTPUT_NODE = True
    CATEGORY = SIGNATURES["VHS_VideoCombine"]["category"]
    FUNCTION = "combine_video"
    DESCRIPTION = "Test stand-in for VideoHelperSuite's Video Combine (tests/vhs_stub)."

    def combine_video(self, images, frame_rate, loop_count, filename_prefix="AnimateDiff", format="image/gif",
                      pingpong=False, save_output=True, prompt=None, extra_pnginfo=None, audio=None,
                      unique_id=None, meta_batch=None, vae=None, **format_widgets):
        import imageio.v2 as imageio

        if format not in WRITERS:
            raise ValueError(f"the VHS test stand-in cannot write {format!r}; it writes {sorted(WRITERS)}")
        if vae is not None or meta_batch is not None or audio is not None:
            raise NotImplementedError("the VHS test stand-in takes IMAGE frames only (no vae, meta_batch, audio)")
        frames = _to_uint8(images)
        if pingpong and len(frames) > 2:
            frames = np.concatenate([frames, frames[-2:0:-1]])
        folder = folder_paths.get_output_directory() if save_output else folder_paths.get_temp_directory()
        full_folder, name, counter, subfolder, _ = folder_paths.get_save_image_path(
            filename_prefix, folder, frames.shape[2], frames.shape[1])
        extension, options = WRITERS[format]
        file = f"{name}_{counter:05}.{extension}"
        path = os.path.join(full_folder, file)
        if extension in ("mp4", "webm"):
            params = ["-crf", str(format_widgets.get("crf", 19))]
            with imageio.get_writer(path, format="FFMPEG", fps=float(frame_rate), quality=None, macro_block_size=1,
                                    pixelformat=format_widgets.get("pix_fmt", "yuv420p"), ffmpeg_params=params,
                                    **options) as writer:
                for frame in frames:
                    writer.append_data(frame)
        elif extension == "gif":
            imageio.mimsave(path, list(frames), format="GIF", duration=1000.0 / float(frame_rate),
                            loop=int(loop_count))
        else:
            from PIL import Image

            pictures = [Image.fromarray(frame) for frame in frames]
            pictures[0].save(path, save_all=True, append_images=pictures[1:], loop=int(loop_count),
                             duration=round(1000.0 / float(frame_rate)), lossless=False, quality=90)
        preview = {"filename": file, "subfolder": subfolder, "type": "output" if save_output else "temp",
                   "format": format, "frame_rate": frame_rate, "fullpath": path}
        return {"ui": {"gifs": [preview]}, "result": ((bool(save_output), [path]),)}


class LoadVideo:
    """Stand-in for VHS_LoadVideo (Load Video (Upload)): a video file in input/ → IMAGE frames."""

    @classmethod
    def INPUT_TYPES(cls):
        spec = _copy(SIGNATURES["VHS_LoadVideo"]["input"])
        spec["required"]["video"] = [_video_files()]
        return spec

    RETURN_TYPES = tuple(SIGNATURES["VHS_LoadVideo"]["output"])
    RETURN_NAMES = tuple(SIGNATURES["VHS_LoadVideo"]["output_name"])
    CATEGORY = SIGNATURES["VHS_LoadVideo"]["category"]
    FUNCTION = "load_video"
    DESCRIPTION = "Test stand-in for VideoHelperSuite's Load Video (Upload) (tests/vhs_stub)."

    @classmethod
    def VALIDATE_INPUTS(cls, video, **kwargs):
        if not folder_paths.exists_annotated_filepath(video):
            return f"Invalid video file: {video}"
        return True

    @classmethod
    def IS_CHANGED(cls, video, **kwargs):
        path = folder_paths.get_annotated_filepath(video)
        return f"{path}:{os.path.getmtime(path)}"

    def load_video(self, video, force_rate=0, custom_width=0, custom_height=0, frame_load_cap=0,
                   skip_first_frames=0, select_every_nth=1, meta_batch=None, vae=None, format="None",
                   force_size=None, unique_id=None, **kwargs):
        import imageio.v2 as imageio

        if vae is not None or meta_batch is not None:
            raise NotImplementedError("the VHS test stand-in returns IMAGE frames only (no vae, meta_batch)")
        path = folder_paths.get_annotated_filepath(video)
        reader = imageio.get_reader(path, format="FFMPEG")
        try:
            source_fps = float(reader.get_meta_data().get("fps") or 8.0)
            source = [np.asarray(frame)[..., :3] for frame in reader]
        finally:
            reader.close()
        if not source:
            raise ValueError(f"{video}: no frames decoded")
        height, width = source[0].shape[:2]
        fps = float(force_rate) if force_rate else source_fps
        if force_rate:  # keep the source frame shown at each target time
            count = int(len(source) * fps / source_fps + 1e-6)
            frames = [source[min(int(i * source_fps / fps + 1e-6), len(source) - 1)] for i in range(count)]
        else:
            frames = source
        frames = frames[int(skip_first_frames):][::max(int(select_every_nth), 1)]
        if frame_load_cap:
            frames = frames[:int(frame_load_cap)]
        if not frames:
            raise ValueError(f"{video}: no frames left after skip_first_frames/select_every_nth")
        images = torch.from_numpy(np.stack(frames)).float() / 255.0
        if custom_width or custom_height:
            new_w = int(custom_width) or round(width * int(custom_height) / height)
            new_h = int(custom_height) or round(height * int(custom_width) / width)
            scale = max(new_w / width, new_h / height)  # cover, then centre-crop (aspect kept, as VHS does)
            scaled = torch.nn.functional.interpolate(images.movedim(-1, 1), scale_factor=scale, mode="bilinear",
                                                     align_corners=False).movedim(1, -1)
            top, left = (scaled.shape[1] - new_h) // 2, (scaled.shape[2] - new_w) // 2
            images = scaled[:, top:top + new_h, left:left + new_w].contiguous()
        info = {"source_fps": source_fps, "source_frame_count": len(source),
                "source_duration": len(source) / source_fps, "source_width": width, "source_height": height,
                "loaded_fps": fps / max(int(select_every_nth), 1), "loaded_frame_count": images.shape[0],
                "loaded_duration": images.shape[0] * max(int(select_every_nth), 1) / fps,
                "loaded_width": images.shape[2], "loaded_height": images.shape[1]}
        return (images, images.shape[0], None, info)


WEB_DIRECTORY = "./web"
NODE_CLASS_MAPPINGS = {"VHS_VideoCombine": VideoCombine, "VHS_LoadVideo": LoadVideo}
NODE_DISPLAY_NAME_MAPPINGS = {name: SIGNATURES[name]["display_name"] for name in NODE_CLASS_MAPPINGS}
