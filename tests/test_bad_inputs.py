"""Bad input through a real ComfyUI server (0.3.75 and 0.33): a table of inputs and the message each must give.

Target: 0 unclear errors and 0 silent garbage. Every case is either refused with a message that names the
input (in the node's own terms) and the fix, or runs as the user meant with each change said under the node
and in the console. Combo values outside their list are refused by ComfyUI 0.33 itself (HTTP 400, naming the
input); 0.3.75 does not check them, so there our nodes must.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from typing import Callable

import pytest
import torch
from safetensors.torch import save_file

from comfy_media import TEST_HEIGHT, TEST_WIDTH, read_video
from comfy_server import execution_error, node_texts
from conftest import TINY_MODEL_NAMES
from easyanimate_core import bucket_size
from test_comfy_nodes import graph, load_image, load_video_frames, run_ok, saved_latent, saved_video

LFS_POINTER = b"version https://git-lfs.github.com/spec/v1\noid sha256:0123456789abcdef\nsize 4548313\n"
HTML_PAGE = b"<!DOCTYPE html><html><head><title>404</title></head><body>Not Found</body></html>\n"
SINGLE_FILE = "EasyAnimateV5-7b-zh-InP.safetensors"
PICKLE_LORA = "style-lora.pt"


def _drop_unk(path):
    lines = path.read_text(encoding="utf-8").splitlines()
    path.write_text("\n".join(line for line in lines if line != "[UNK]") + "\n", encoding="utf-8")


def _bert_in_t5(folder):
    shutil.copy(folder / "text_encoder" / "model.safetensors", folder / "text_encoder_2" / "model.safetensors")


def _pickle_only(folder):
    weights = folder / "text_encoder_2" / "model.safetensors"
    weights.rename(weights.with_name("pytorch_model.bin"))


# Damaged copies of the tiny T2V folder: name → how it is damaged.
DAMAGED = {
    "broken-lfs-spiece": lambda f: (f / "tokenizer_2" / "spiece.model").write_bytes(LFS_POINTER),
    "broken-lfs-weights":
        lambda f: (f / "transformer" / "diffusion_pytorch_model.safetensors").write_bytes(LFS_POINTER),
    "broken-html-config": lambda f: (f / "scheduler" / "scheduler_config.json").write_bytes(HTML_PAGE),
    "broken-empty-te": lambda f: (f / "text_encoder" / "model.safetensors").write_bytes(b""),
    "broken-empty-vocab": lambda f: (f / "tokenizer" / "vocab.txt").write_bytes(b""),
    "broken-vocab-no-unk": lambda f: _drop_unk(f / "tokenizer" / "vocab.txt"),
    "broken-bert-in-t5": _bert_in_t5,
    "broken-pickle-only": _pickle_only,
}


@pytest.fixture(scope="module")
def bad_files(comfy):
    """The damaged folders, a single-file checkpoint and a pickle LoRA, in this server's model folders."""
    source = comfy.models_dir / TINY_MODEL_NAMES["t2v"]
    for name, damage in DAMAGED.items():
        folder = comfy.models_dir / name
        if not folder.exists():
            shutil.copytree(source, folder)
            damage(folder)
    single = comfy.models_dir / SINGLE_FILE
    if not single.exists():
        save_file({"transformer.x": torch.zeros(2)}, str(single))
    lora = comfy.base / "models" / "loras" / PICKLE_LORA
    if not lora.exists():
        torch.save({"lora_unet_x.lora_down.weight": torch.zeros(2, 2)}, lora)
    return comfy


# ---------------------------------------------------------------------------------------------- prompt pieces
def loader_only(model_name: str) -> dict:
    """Loader → Text Encode → a saved latent: enough to make the loader run."""
    return graph("t2v", model_name=model_name, steps=1, save="latent")


def encoded_clip() -> dict:
    nodes = load_video_frames("31", "clip.mp4")
    nodes["30"] = {"class_type": "EasyAnimateVAEEncode", "inputs": {"vae": ["1", 2], "pixels": ["31", 0],
                                                                     "size": "input"}}
    return nodes


def first_frames(node_id: str, source: list, count: int) -> dict:
    return {node_id: {"class_type": "ImageFromBatch", "inputs": {"image": source, "batch_index": 0, "length": count}}}


def control_of(frames_node: list) -> dict:
    return {"20": {"class_type": "EasyAnimateControlVideo",
                   "inputs": {"vae": ["1", 2], "control_video": frames_node, "size": "explicit",
                              "width": TEST_WIDTH, "height": TEST_HEIGHT}}}


def short_control_with_long_latent() -> dict:
    """The reported case: a 3-frame input video (1 usable frame) with a 9-frame latent."""
    nodes = {**load_video_frames("21", "clip.mp4"), **first_frames("22", ["21", 0], 3), **control_of(["22", 0])}
    prompt = graph("control", conditioning=nodes)
    prompt["3"]["inputs"]["length"] = 9
    prompt["4"]["inputs"]["latent_image"] = ["3", 0]
    return prompt


def tiny_start_image() -> dict:
    nodes = {"21": {"class_type": "EmptyImage", "inputs": {"width": 1, "height": 1, "batch_size": 1, "color": 0}}}
    nodes["20"] = {"class_type": "EasyAnimateImageToVideo",
                   "inputs": {"vae": ["1", 2], "start_image": ["21", 0], "length": 5, "size": "bucket 512",
                              "width": TEST_WIDTH, "height": TEST_HEIGHT}}
    return graph("inpaint", conditioning=nodes)


def inpaint_with_mask_batch(count: int) -> dict:
    """Video Inpaint on the 10-frame clip with `count` masks made from its first frames (Convert Image to Mask)."""
    nodes = {**load_video_frames("21", "clip.mp4"), **first_frames("25", ["21", 0], count),
             "24": {"class_type": "ImageToMask", "inputs": {"image": ["25", 0], "channel": "red"}}}
    nodes["20"] = {"class_type": "EasyAnimateVideoInpaint",
                   "inputs": {"vae": ["1", 2], "video": ["21", 0], "mask": ["24", 0], "size": "explicit",
                              "width": TEST_WIDTH, "height": TEST_HEIGHT}}
    return graph("inpaint", conditioning=nodes, denoise=0.7, steps=3)


def sd_latent() -> dict:
    """An image model's latent (4 channels, no frames), as ComfyUI's Empty Latent Image makes it."""
    return {"30": {"class_type": "EmptyLatentImage", "inputs": {"width": TEST_WIDTH, "height": TEST_HEIGHT,
                                                                 "batch_size": 1}}}


def sd_latent_decoded() -> dict:
    prompt = graph("t2v", latent=sd_latent())
    prompt["5"]["inputs"]["samples"] = ["30", 0]
    del prompt["4"]
    return prompt


# ---------------------------------------------------------------------------------------------- refusals
@dataclass
class Refusal:
    """A prompt that must be refused: by `node` with every fragment in its message (or, for combo values
    outside their list, by ComfyUI 0.33's own validation naming `combo_input`)."""

    build: Callable[[], dict]
    node: str
    fragments: tuple[str, ...]
    absent: tuple[str, ...] = ()
    combo_input: str | None = None
    extra: dict = field(default_factory=dict)


REFUSALS = {
    # Damaged or mixed-up model folders
    "lfs-pointer-spiece": Refusal(lambda: loader_only("broken-lfs-spiece"), "EasyAnimateModelLoader",
                                  ("tokenizer_2/spiece.model is a git-lfs pointer", "git lfs pull"),
                                  absent=("pip install", "tiktoken")),
    "lfs-pointer-weights": Refusal(lambda: loader_only("broken-lfs-weights"), "EasyAnimateModelLoader",
                                   ("transformer/diffusion_pytorch_model.safetensors is a git-lfs pointer",
                                    "git lfs pull")),
    "html-page-config": Refusal(lambda: loader_only("broken-html-config"), "EasyAnimateModelLoader",
                                ("scheduler/scheduler_config.json is an HTML page", "Download this file")),
    "empty-weights": Refusal(lambda: loader_only("broken-empty-te"), "EasyAnimateModelLoader",
                             ("text_encoder/model.safetensors is empty (0 bytes)", "Download this file")),
    "empty-vocab": Refusal(lambda: loader_only("broken-empty-vocab"), "EasyAnimateModelLoader",
                           ("tokenizer/vocab.txt is empty (0 bytes)",)),
    "vocab-without-unk": Refusal(lambda: loader_only("broken-vocab-no-unk"), "EasyAnimateModelLoader",
                                 ("tokenizer/vocab.txt has no unknown-word token '[UNK]'", "Download it again")),
    "bert-weights-in-text_encoder_2": Refusal(lambda: loader_only("broken-bert-in-t5"), "EasyAnimateModelLoader",
                                              ("text_encoder_2/model.safetensors does not hold the weights",
                                               "look like BERT weights", "random weights")),
    "pickle-only-folder": Refusal(lambda: loader_only("broken-pickle-only"), "EasyAnimateModelLoader",
                                  ("text_encoder_2 holds only pickle weights (pytorch_model.bin)",
                                   "never loaded, for safety", "safetensors versions"), absent=("incomplete",)),
    "single-file-checkpoint": Refusal(lambda: loader_only(SINGLE_FILE), "EasyAnimateModelLoader",
                                      ("single-file checkpoints are not supported", "transformer/config.json",
                                       "tokenizer_2/spiece.model", "alibaba-pai/EasyAnimateV5-7b-zh-InP")),
    "model_name-outside-the-folder": Refusal(lambda: loader_only("../loras"), "EasyAnimateModelLoader",
                                             ("model_name '../loras' is not a model folder under models/EasyAnimate/",),
                                             combo_input="model_name"),
    # (an official name no other test creates in the shared server: test_comfy_nodes leaves a half-copied
    # EasyAnimateV5-7b-zh there, which is refused as incomplete instead)
    "model-not-downloaded": Refusal(lambda: loader_only("EasyAnimateV5-12b-zh"), "EasyAnimateModelLoader",
                                    ("'EasyAnimateV5-12b-zh' was not found", "downloading it failed",
                                     "hf download alibaba-pai/EasyAnimateV5-12b-zh --local-dir"),
                                    absent=("alibaba-pai/EasyAnimateV5-12b-zh-InP",), combo_input="model_name"),
    "pickle-lora": Refusal(lambda: graph("t2v", loras=[(PICKLE_LORA, 0.7)]), "EasyAnimateLoraLoader",
                           (f"{PICKLE_LORA} is a pickle file", "never loaded, for safety", ".safetensors version"),
                           absent=("corrupt",), combo_input="lora_name"),
    # Refusals in the node's language
    "denoise-leaves-no-step": Refusal(lambda: graph("t2v", steps=2, denoise=0.01, latent=encoded_clip()),
                                      "EasyAnimateSampler",
                                      ("denoise 0.01 × steps 2 leaves no step to run", "raise denoise to at least 0.5"),
                                      absent=("strength",)),
    "control-model-without-control-video": Refusal(lambda: graph("control"), "EasyAnimateSampler",
                                                   ("connect EasyAnimate Control Video to video_conditioning",),
                                                   absent=("pass control_video",)),
    "input-video-shorter-than-the-latent": Refusal(short_control_with_long_latent, "EasyAnimateSampler",
                                                   ("control_video in video_conditioning has 1 usable frame but "
                                                    "latent_image asks for 9", "set the length to 1")),
    "1x1-start-image": Refusal(tiny_start_image, "EasyAnimateImageToVideo", ("start_image is only 1x1 pixels",)),
    "too-few-masks": Refusal(lambda: inpaint_with_mask_batch(3), "EasyAnimateVideoInpaint",
                             ("mask holds 3 masks but 9 frames of the video are used", "one per frame")),
    "pndm-with-too-few-steps": Refusal(lambda: graph("t2v", sampler="PNDM", steps=2), "EasyAnimateSampler",
                                       ("sampler_name PNDM needs steps of at least 4 (got 2)", "raise steps"),
                                       absent=("step count",)),
    "image-latent-into-the-sampler": Refusal(lambda: graph("t2v", latent=sd_latent()), "EasyAnimateSampler",
                                             ("latent_image must be an EasyAnimate video latent",
                                              "EasyAnimate Empty Video Latent")),
    "image-latent-into-vae-decode": Refusal(sd_latent_decoded, "EasyAnimateVAEDecode",
                                            ("samples must be an EasyAnimate video latent",)),
    "sampler-not-in-the-list": Refusal(lambda: graph("t2v", sampler="LCM"), "EasyAnimateSampler",
                                       ("sampler_name must be one of DDIM, Euler, Euler A, DPM++, PNDM; got 'LCM'",),
                                       combo_input="sampler_name"),
}


def refusal_text(comfy, prompt: dict) -> tuple[str, str]:
    """(who refused: 'server' or the node type, the message); fails when the prompt runs."""
    status, answer = comfy.queue(prompt)
    if status == 400:
        return "server", json.dumps(answer)
    assert status == 200, answer
    entry = comfy.wait(answer["prompt_id"])
    error = execution_error(entry)
    assert error is not None, f"ran without an error (silent garbage?): {entry['status']} {entry.get('outputs')}"
    return error["node_type"], error["exception_message"]


@pytest.mark.parametrize("case", list(REFUSALS))
def test_bad_input_is_refused_with_a_message_naming_the_input_and_the_fix(bad_files, case):
    comfy, expected = bad_files, REFUSALS[case]
    who, message = refusal_text(comfy, expected.build())
    if who == "server":  # only ComfyUI 0.33 refuses combo values itself, naming the input
        assert comfy.version != "0.3.75" and expected.combo_input, message
        assert "value_not_in_list" in message and expected.combo_input in message, message
        return
    assert who == expected.node, (who, message)
    for fragment in expected.fragments:
        assert fragment in message, f"{fragment!r} not in:\n{message}"
    for fragment in expected.absent:
        assert fragment not in message, f"{fragment!r} in:\n{message}"


def test_lists_offer_what_can_load(bad_files):
    """The LoRA list has no pickle; the model list shows a single file (choosing it says why it cannot load)."""
    info = bad_files.object_info()
    loras = info["EasyAnimateLoraLoader"]["input"]["required"]["lora_name"][1]["options"]
    assert loras and all(name.endswith(".safetensors") for name in loras) and PICKLE_LORA not in loras
    models = info["EasyAnimateModelLoader"]["input"]["required"]["model_name"][1]["options"]
    assert SINGLE_FILE in models and "broken-lfs-spiece" in models


def test_a_loaded_model_survives_a_refused_folder(bad_files, tiny_pipeline):
    """A damaged folder's refusal leaves the previously loaded model working and exact."""
    comfy = bad_files
    run_ok(comfy, graph("t2v", steps=1))
    refusal_text(comfy, loader_only("broken-bert-in-t5"))
    entry = run_ok(comfy, graph("t2v", seed=9, save="latent"))
    core = tiny_pipeline("t2v").generate("a red fox running through snow", "blurry", height=TEST_HEIGHT,
                                         width=TEST_WIDTH, num_frames=5, num_inference_steps=2, seed=9)
    assert (saved_latent(comfy, entry) - core.latents).abs().max() <= 1e-5


# ---------------------------------------------------------------------------------------------- visible changes
def said(comfy, entry, node_id: str, node_title: str, fragment: str) -> None:
    """`fragment` is under the node (its text) and in the console, attributed to the node."""
    texts = "\n".join(node_texts(entry, node_id))
    assert fragment in texts, texts
    console = [line for line in comfy.log().splitlines() if f"EasyAnimate {node_title}: " in line and fragment in line]
    assert console, f"{fragment!r} was not written to the console:\n{comfy.log_tail(20)}"


def test_rgba_start_image_is_accepted_alpha_dropped_with_a_note(comfy):
    nodes = load_image("23", "start.png")
    nodes["24"] = {"class_type": "SolidMask", "inputs": {"value": 0.5, "width": TEST_WIDTH, "height": TEST_HEIGHT}}
    nodes["21"] = {"class_type": "JoinImageWithAlpha", "inputs": {"image": ["23", 0], "alpha": ["24", 0]}}
    nodes["20"] = {"class_type": "EasyAnimateImageToVideo",
                   "inputs": {"vae": ["1", 2], "start_image": ["21", 0], "length": 5, "size": "explicit",
                              "width": TEST_WIDTH, "height": TEST_HEIGHT}}
    entry = run_ok(comfy, graph("inpaint", conditioning=nodes, save="latent"))
    said(comfy, entry, "20", "Image to Video", "start_image has an alpha channel (RGBA): the alpha is dropped")
    plain = {**load_image("21", "start.png"), "20": nodes["20"]}
    rgb = run_ok(comfy, graph("inpaint", conditioning=plain, save="latent"))
    assert torch.equal(saved_latent(comfy, entry), saved_latent(comfy, rgb))


def test_length_2_becomes_one_frame_and_says_so(comfy):
    nodes = load_image("21", "start.png")
    nodes["20"] = {"class_type": "EasyAnimateImageToVideo",
                   "inputs": {"vae": ["1", 2], "start_image": ["21", 0], "length": 2, "size": "explicit",
                              "width": TEST_WIDTH, "height": TEST_HEIGHT}}
    entry = run_ok(comfy, graph("inpaint", conditioning=nodes))
    said(comfy, entry, "20", "Image to Video", "length 2 is not 4k+1: using 1 (a single frame")
    assert read_video(saved_video(comfy, entry))[0] == 1


def test_three_frame_video_with_its_own_latent_says_it_makes_one_frame(comfy):
    nodes = {**load_video_frames("21", "clip.mp4"), **first_frames("22", ["21", 0], 3), **control_of(["22", 0])}
    entry = run_ok(comfy, graph("control", conditioning=nodes))
    said(comfy, entry, "20", "Control Video", "control_video has 3 frames; EasyAnimate takes 4k+1 frames, so only "
                                              "its first frame is used")
    assert read_video(saved_video(comfy, entry))[0] == 1


def test_small_image_in_bucket_mode_says_the_size_used(comfy):
    nodes = {"21": {"class_type": "EmptyImage", "inputs": {"width": 24, "height": 16, "batch_size": 1, "color": 0}}}
    nodes["20"] = {"class_type": "EasyAnimateImageToVideo",
                   "inputs": {"vae": ["1", 2], "start_image": ["21", 0], "length": 1, "size": "bucket 512",
                              "width": TEST_WIDTH, "height": TEST_HEIGHT}}
    entry = run_ok(comfy, graph("inpaint", conditioning=nodes, steps=1, save="latent"))
    height, width = bucket_size(16, 24, 512)
    said(comfy, entry, "20", "Image to Video", f"size {width}x{height} (bucket 512, nearest to the input's 24x16)")


def test_mask_of_another_size_is_stretched_and_says_so(comfy):
    nodes = load_video_frames("21", "clip.mp4")
    nodes["24"] = {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 48, "height": 40}}
    nodes["20"] = {"class_type": "EasyAnimateVideoInpaint",
                   "inputs": {"vae": ["1", 2], "video": ["21", 0], "mask": ["24", 0], "size": "explicit",
                              "width": TEST_WIDTH, "height": TEST_HEIGHT}}
    entry = run_ok(comfy, graph("inpaint", conditioning=nodes, denoise=0.7, steps=2, save="latent"))
    said(comfy, entry, "20", "Video Inpaint",
         "mask is 48x40, the video 112x64: the mask is stretched to the output size")
