"""The Long Video Sampler node inside a real ComfyUI server (both versions): equality with the core's
generate_long, the note, per-chunk prompts, one progress bar, Cancel and errors."""
from __future__ import annotations

import numpy as np
import torch

from comfy_media import TEST_HEIGHT, TEST_WIDTH
from comfy_server import interrupt_once, node_progress, node_texts
from conftest import TINY_MODEL_NAMES
from test_comfy_nodes import NEGATIVE, PROMPT, run_error, run_ok


def long_graph(kind="inpaint", *, mode="continue", frames=13, chunk=9, overlap=4, steps=2, seed=43, cfg=6.0,
               fuse="linear", start=False, control=False, chunk_prompts=None, text_encoders=False) -> dict:
    """Loader → Text Encode → Long Video Sampler → SaveImage (one PNG per frame)."""
    sampler = {"model": ["1", 0], "vae": ["1", 2], "positive": ["2", 0], "negative": ["2", 1], "mode": mode,
               "total_frames": frames, "chunk_frames": chunk, "overlap_frames": overlap, "size": "explicit",
               "width": TEST_WIDTH, "height": TEST_HEIGHT, "seed": seed, "steps": steps, "cfg": cfg,
               "sampler_name": "DDIM", "fuse": fuse}
    prompt = {
        "1": {"class_type": "EasyAnimateModelLoader",
              "inputs": {"model_name": TINY_MODEL_NAMES[kind], "precision": "auto", "memory_mode": "auto",
                         "swap_blocks": 0, "attention": "sdpa", "compile": False}},
        "2": {"class_type": "EasyAnimateTextEncode",
              "inputs": {"text_encoders": ["1", 1], "prompt": PROMPT, "negative_prompt": NEGATIVE}},
        "4": {"class_type": "EasyAnimateLongVideoSampler", "inputs": sampler},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": "long/frames"}},
    }
    if start:
        prompt["21"] = {"class_type": "LoadImage", "inputs": {"image": "start.png"}}
        sampler["start_image"] = ["21", 0]
    if control:
        # Through the VideoHelperSuite stand-in (imageio, as read_frames): ComfyUI 0.33's own LoadVideo decodes
        # h264 to float32 off the uint8 grid, which would compare two video decoders rather than our nodes.
        prompt["22"] = {"class_type": "VHS_LoadVideo",
                        "inputs": {"video": "pose.mp4", "force_rate": 0, "custom_width": 0, "custom_height": 0,
                                   "frame_load_cap": 0, "skip_first_frames": 0, "select_every_nth": 1}}
        sampler["control_frames"] = ["22", 0]
    if chunk_prompts is not None:
        sampler["chunk_prompts"] = chunk_prompts
    if text_encoders:
        sampler["text_encoders"] = ["1", 1]
    return prompt


def saved_frames(comfy, entry) -> torch.Tensor:
    """The PNGs SaveImage wrote, in order, as uint8 [F,H,W,3]."""
    from PIL import Image

    items = entry["outputs"]["9"]["images"]
    return torch.from_numpy(np.stack([np.asarray(Image.open(comfy.output_dir / i["subfolder"] / i["filename"]))
                                      for i in items]))


def assert_same_frames(saved: torch.Tensor, core_frames: torch.Tensor) -> None:
    want = (core_frames * 255).clamp(0, 255).to(torch.uint8)  # SaveImage truncates like this
    assert saved.shape == want.shape, (saved.shape, want.shape)
    assert (saved.int() - want.int()).abs().max() <= 1


def test_continue_equals_core_generate_long_and_says_how_many_chunks(comfy, tiny_pipeline):
    from easyanimate_core.media import read_image

    entry = run_ok(comfy, long_graph(start=True, seed=7, frames=14))
    core = tiny_pipeline("inpaint").generate_long(
        PROMPT, NEGATIVE, height=TEST_HEIGHT, width=TEST_WIDTH, num_frames=14, chunk_frames=9, overlap_frames=4,
        num_inference_steps=2, seed=7, start_image=read_image(comfy.input_dir / "start.png"))
    assert_same_frames(saved_frames(comfy, entry), core.frames)
    note = node_texts(entry, "4")[0]
    assert "continue: 2 chunks of up to 9 frames, 14 frames at 112x64" in note, note  # 9 + 9 − 4


def test_windows_over_a_control_video_equal_core(comfy, tiny_pipeline):
    from easyanimate_core.media import read_frames

    entry = run_ok(comfy, long_graph("control", mode="windows", frames=33, chunk=5, overlap=4, control=True,
                                     fuse="pyramid"))
    control = read_frames(comfy.input_dir / "pose.mp4")
    core = tiny_pipeline("control").generate_long(
        PROMPT, NEGATIVE, height=TEST_HEIGHT, width=TEST_WIDTH, num_frames=33, chunk_frames=5, overlap_frames=4,
        mode="windows", num_inference_steps=2, seed=43, control_video=control)
    assert core.frames.shape[0] == 9 and len(core.windows) == 2  # the 10-frame pose clip → 9 frames, 3 latents
    assert_same_frames(saved_frames(comfy, entry), core.frames)
    texts = node_texts(entry, "4")[0]
    assert "windows: 2 windows of 2 latent frames per step, 9 frames" in texts
    assert "the control video has 10 frames: making 9" in texts


def test_chunk_prompts_one_per_line_equal_core_prompt_list(comfy, tiny_pipeline):
    entry = run_ok(comfy, long_graph(chunk_prompts="a cat\n\n  a dog  \n", text_encoders=True, steps=1))
    core = tiny_pipeline("inpaint").generate_long(
        ["a cat", "a dog"], NEGATIVE, height=TEST_HEIGHT, width=TEST_WIDTH, num_frames=13, chunk_frames=9,
        overlap_frames=4, num_inference_steps=1, seed=43)
    assert_same_frames(saved_frames(comfy, entry), core.frames)
    assert "2 chunk prompts" in node_texts(entry, "4")[0]


def test_one_progress_bar_over_all_chunks_and_cancel_leaves_the_model(comfy, tiny_pipeline):
    progress = []

    def on_message(event):
        if node_progress(event, "4"):
            progress.append(node_progress(event, "4"))
        return interrupt_once(comfy, event, "4", at_step=5)  # in the second of 8 chunks

    entry = comfy.watch(long_graph(steps=3, frames=41, seed=5), "long-cancel-test", on_message)
    assert "execution_interrupted" in [name for name, _ in entry["status"]["messages"]]
    values = [v for v, _ in progress]
    assert {m for _, m in progress} == {8 * 3}, progress  # one bar over 8 chunks x 3 steps
    if comfy.version == "0.3.75":
        assert values[-5:] == [1, 2, 3, 4, 5]
    else:  # 0.33's ProgressBar sends the first step and throttles the rest to one per 100 ms
        assert values[0] == 1 and values == sorted(set(values)), values
    entry = run_ok(comfy, long_graph(steps=1, seed=5))
    core = tiny_pipeline("inpaint").generate_long(
        PROMPT, NEGATIVE, height=TEST_HEIGHT, width=TEST_WIDTH, num_frames=13, chunk_frames=9, overlap_frames=4,
        num_inference_steps=1, seed=5)
    assert_same_frames(saved_frames(comfy, entry), core.frames)


def test_bad_input_is_refused_with_what_to_do(comfy):
    error = run_error(comfy, long_graph("t2v", steps=1))
    assert error["node_type"] == "EasyAnimateLongVideoSampler"
    assert "Load an InP model" in error["exception_message"] and "'windows'" in error["exception_message"]
    error = run_error(comfy, long_graph(chunk=9, overlap=9, steps=1))
    assert "overlap_frames must be at least 1 and below chunk_frames (9)" in error["exception_message"]
    error = run_error(comfy, long_graph(chunk=11, steps=1))
    assert "chunk_frames must be 4k+1" in error["exception_message"]
    error = run_error(comfy, long_graph(chunk_prompts="a\nb", steps=1))
    assert "chunk_prompts needs the text_encoders input" in error["exception_message"]
    error = run_error(comfy, long_graph(chunk_prompts="a\nb\nc", text_encoders=True, steps=1))
    assert "3 prompts for 2 chunks" in error["exception_message"]
