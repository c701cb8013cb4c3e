"""Region editing with a mask per frame (a moving mask) or one mask for every frame, through a real ComfyUI
server (0.3.75 and 0.33): both give exactly the core's result for the same frames and masks."""
from __future__ import annotations

import pytest
import torch

from comfy_media import TEST_HEIGHT, TEST_WIDTH
from test_comfy_nodes import NEGATIVE, PROMPT, graph, load_image, node_texts, run_ok, saved_latent

STEPS, DENOISE = 3, 0.7


def region_edit(per_frame: bool) -> dict:
    """Video Inpaint on a 6-frame video (start, end, start, end, ...) with masks from the frames' red channel
    (Convert Image to Mask): one per frame, so the masked region moves, or the first frame's mask for all."""
    nodes = {**load_image("26", "start.png"), **load_image("27", "end.png")}
    nodes["28"] = {"class_type": "ImageBatch", "inputs": {"image1": ["26", 0], "image2": ["27", 0]}}
    nodes["21"] = {"class_type": "RepeatImageBatch", "inputs": {"image": ["28", 0], "amount": 3}}
    nodes["24"] = {"class_type": "ImageToMask",
                   "inputs": {"image": ["21", 0] if per_frame else ["26", 0], "channel": "red"}}
    nodes["20"] = {"class_type": "EasyAnimateVideoInpaint",
                   "inputs": {"vae": ["1", 2], "video": ["21", 0], "mask": ["24", 0], "size": "explicit",
                              "width": TEST_WIDTH, "height": TEST_HEIGHT}}
    return graph("inpaint", conditioning=nodes, denoise=DENOISE, steps=STEPS, save="latent")


def core_region_edit(pipe, comfy, per_frame: bool) -> torch.Tensor:
    from easyanimate_core.media import read_image

    start, end = (read_image(comfy.input_dir / name) for name in ("start.png", "end.png"))
    video = torch.stack([start, end] * 3)
    mask = video[..., 0] if per_frame else start[None, ..., 0]
    return pipe.generate(PROMPT, NEGATIVE, height=TEST_HEIGHT, width=TEST_WIDTH, num_frames=5,
                         num_inference_steps=STEPS, seed=43, video=video, mask=mask, strength=DENOISE).latents


@pytest.mark.parametrize("per_frame", [True, False], ids=["mask-per-frame", "one-mask-for-all-frames"])
def test_region_edit_equals_core_with_the_same_masks(comfy, tiny_pipeline, per_frame):
    entry = run_ok(comfy, region_edit(per_frame))
    notes = "\n".join(node_texts(entry, "20"))
    assert "video has 6 frames; EasyAnimate takes 4k+1 frames, so the first 5 are used" in notes
    if per_frame:
        assert "mask holds 6 masks; the first 5 are used, one per frame" in notes
    core = core_region_edit(tiny_pipeline("inpaint"), comfy, per_frame)
    assert (saved_latent(comfy, entry) - core).abs().max() <= 1e-5


def test_a_moving_mask_changes_the_result(comfy, tiny_pipeline):
    """The per-frame masks are really used per frame: the result differs from the first mask held still."""
    pipe = tiny_pipeline("inpaint")
    moving, still = (core_region_edit(pipe, comfy, per_frame) for per_frame in (True, False))
    assert (moving - still).abs().max() > 1e-3
    entry = run_ok(comfy, region_edit(True))
    assert (saved_latent(comfy, entry) - still).abs().max() > 1e-3
