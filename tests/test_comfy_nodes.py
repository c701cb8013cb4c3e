"""Our nodes inside a real ComfyUI server (0.3.75 and 0.33.0): schemas, exact results, progress, Cancel, and errors."""
from __future__ import annotations

import json
import shutil

import torch
from safetensors.torch import load_file

from comfy_media import INPUT_VIDEO_FRAMES, TEST_HEIGHT, TEST_WIDTH, read_video
from comfy_server import execution_error, interrupt_once, node_progress, node_texts
from conftest import TINY_LORAS, TINY_MODEL_NAMES

OUR_NODES = {"EasyAnimateModelLoader", "EasyAnimateLoraLoader", "EasyAnimateTextEncode", "EasyAnimateEmptyLatent", "EasyAnimateImageToVideo",
             "EasyAnimateVideoInpaint", "EasyAnimateControlVideo", "EasyAnimateResolutionBucket",
             "EasyAnimateCannyEdges", "EasyAnimateSampler", "EasyAnimateVAEDecode", "EasyAnimateVAEEncode"}
PROMPT, NEGATIVE = "a red fox running through snow", "blurry"


# ---------------------------------------------------------------------------------------------- prompt building
def graph(kind="t2v", *, model_name=None, steps=2, seed=43, cfg=6.0, sampler="DDIM", denoise=1.0, frames=5,
          conditioning=None, latent=None, save="video", precision="auto", loras=(), memory_mode="auto",
          swap_blocks=0, attention="sdpa"):
    """An API-format prompt: loader → text → latent (or conditioning) → sampler → decode → save."""
    prompt = {
        "1": {"class_type": "EasyAnimateModelLoader",
              "inputs": {"model_name": model_name or TINY_MODEL_NAMES[kind], "precision": precision,
                         "memory_mode": memory_mode, "swap_blocks": swap_blocks, "attention": attention,
                         "compile": False}},
        "2": {"class_type": "EasyAnimateTextEncode",
              "inputs": {"text_encoders": ["1", 1], "prompt": PROMPT, "negative_prompt": NEGATIVE}},
        "3": {"class_type": "EasyAnimateEmptyLatent",
              "inputs": {"width": TEST_WIDTH, "height": TEST_HEIGHT, "length": frames}},
        "4": {"class_type": "EasyAnimateSampler",
              "inputs": {"model": ["1", 0], "positive": ["2", 0], "negative": ["2", 1], "latent_image": ["3", 0],
                         "seed": seed, "steps": steps, "cfg": cfg, "sampler_name": sampler, "denoise": denoise}},
    }
    model = ["1", 0]
    for i, (name, strength) in enumerate(loras):
        prompt[f"4{i}"] = {"class_type": "EasyAnimateLoraLoader",
                           "inputs": {"model": model, "lora_name": name, "strength": strength}}
        model = [f"4{i}", 0]
    prompt["4"]["inputs"]["model"] = model
    if conditioning is not None:
        prompt.update(conditioning)
        prompt["4"]["inputs"]["video_conditioning"] = ["20", 0]
        prompt["4"]["inputs"]["latent_image"] = ["20", 1]
    if latent is not None:
        prompt.update(latent)
        prompt["4"]["inputs"]["latent_image"] = ["30", 0]
    if save == "latent":
        prompt["9"] = {"class_type": "SaveLatent", "inputs": {"samples": ["4", 0], "filename_prefix": "latents/t"}}
    else:
        prompt["5"] = {"class_type": "EasyAnimateVAEDecode",
                       "inputs": {"vae": ["1", 2], "samples": ["4", 0], "tiling": False, "tile_size": 384}}
        prompt["6"] = {"class_type": "CreateVideo", "inputs": {"images": ["5", 0], "fps": 8.0}}
        prompt["7"] = {"class_type": "SaveVideo", "inputs": {"video": ["6", 0], "filename_prefix": "video/nodes",
                                                             "format": "mp4", "codec": "h264"}}
    return prompt


def load_image(node_id: str, name: str) -> dict:
    return {node_id: {"class_type": "LoadImage", "inputs": {"image": name}}}


def load_video_frames(node_id: str, name: str) -> dict:
    """LoadVideo → GetVideoComponents: the frames are output 0 of node `node_id`."""
    return {f"{node_id}v": {"class_type": "LoadVideo", "inputs": {"file": name}},
            node_id: {"class_type": "GetVideoComponents", "inputs": {"video": [f"{node_id}v", 0]}}}


def image_to_video(frames=5, end=None, size="explicit") -> dict:
    nodes = load_image("21", "start.png")
    inputs = {"vae": ["1", 2], "start_image": ["21", 0], "length": frames, "size": size,
              "width": TEST_WIDTH, "height": TEST_HEIGHT}
    if end is not None:
        nodes.update(load_image("22", end))
        inputs["end_image"] = ["22", 0]
    nodes["20"] = {"class_type": "EasyAnimateImageToVideo", "inputs": inputs}
    return nodes


def control_video(source="pose.mp4") -> dict:
    nodes = load_video_frames("21", source)
    nodes["20"] = {"class_type": "EasyAnimateControlVideo",
                   "inputs": {"vae": ["1", 2], "control_video": ["21", 0], "size": "explicit",
                              "width": TEST_WIDTH, "height": TEST_HEIGHT}}
    return nodes


def run_ok(comfy, prompt, timeout=300) -> dict:
    entry = comfy.run(prompt, timeout)
    error = execution_error(entry)
    assert error is None and entry["status"]["status_str"] == "success", \
        f"{json.dumps(error, indent=1)[:4000]}\n{comfy.log_tail()}"
    return entry


def run_error(comfy, prompt) -> dict:
    entry = comfy.run(prompt)
    error = execution_error(entry)
    assert error is not None, f"expected the run to fail: {entry['status']}"
    return error


def refused_or_error(comfy, prompt: dict, input_name: str, value: str) -> str | None:
    """The run's error message, or None where the server refused the prompt itself because `value` is not
    among `input_name`'s options (ComfyUI 0.33 validates combo values; 0.3.75 leaves it to our node)."""
    status, answer = comfy.queue(prompt)
    if status == 400:
        assert comfy.version != "0.3.75", answer
        details = [e["details"] for errors in answer["node_errors"].values() for e in errors["errors"]]
        assert any(f"{input_name}: '{value}' not in" in d for d in details), answer
        return None
    assert status == 200, answer
    error = execution_error(comfy.wait(answer["prompt_id"]))
    assert error is not None, "expected the run to fail"
    return error


def saved_file(comfy, entry, node_id, key) -> str:
    item = entry["outputs"][node_id][key][0]
    return comfy.output_dir / item["subfolder"] / item["filename"]


def saved_video(comfy, entry, node_id="7"):
    return saved_file(comfy, entry, node_id, "images")


VAE_SCALING_FACTOR = 0.7125


def saved_latent(comfy, entry, node_id="9") -> torch.Tensor:
    """A saved LATENT (unscaled: ComfyUI's convention) scaled as the core's GenerationResult.latents are."""
    return load_file(str(saved_file(comfy, entry, node_id, "latents")))["latent_tensor"] * VAE_SCALING_FACTOR


# ---------------------------------------------------------------------------------------------- schema
def test_pack_registers_every_node_with_tooltips(comfy):
    info = comfy.object_info()
    assert OUR_NODES <= set(info), f"missing nodes: {OUR_NODES - set(info)}"
    for node_id in OUR_NODES:
        node = info[node_id]
        assert node["category"] == "EasyAnimate" and node["description"]
        inputs = {**node["input"]["required"], **node["input"].get("optional", {})}
        for name, (kind, options) in inputs.items():
            assert options.get("tooltip"), f"{node_id}.{name} has no tooltip"
        # Ids are checked by ComfyUI when the pack registers (an overlap fails the import); object_info shows
        # output display names, and the LoRA node deliberately shows its output as "model" too.
        if node_id != "EasyAnimateLoraLoader":
            assert not set(inputs) & set(node["output_name"]), f"{node_id}: input and output names overlap"
    options = info["EasyAnimateModelLoader"]["input"]["required"]["model_name"][1]["options"]
    assert set(TINY_MODEL_NAMES.values()) <= set(options)
    assert info["EasyAnimateSampler"]["input"]["required"]["sampler_name"][1]["options"] == \
        ["DDIM", "Euler", "Euler A", "DPM++", "PNDM"]


# ---------------------------------------------------------------------------------------------- exactness
def test_text_to_video_writes_the_video(comfy):
    entry = run_ok(comfy, graph("t2v", frames=9))
    frames, size, fps = read_video(saved_video(comfy, entry))
    assert (frames, size, fps) == (9, (TEST_WIDTH, TEST_HEIGHT), 8.0)
    assert "9 frames at 112x64, 2 of 2 steps DDIM, cfg 6, seed 43" in node_texts(entry, "4")[0]


def test_text_to_video_latent_equals_core_generate(comfy, tiny_pipeline):
    entry = run_ok(comfy, graph("t2v", seed=7, sampler="Euler", save="latent"))
    ours = saved_latent(comfy, entry)
    core = tiny_pipeline("t2v").generate(PROMPT, NEGATIVE, height=TEST_HEIGHT, width=TEST_WIDTH, num_frames=5,
                                         num_inference_steps=2, sampler="Euler", seed=7)
    assert ours.shape == core.latents.shape == (1, 16, 2, 8, 14)
    assert (ours - core.latents).abs().max() <= 1e-5


def test_image_to_video_latent_equals_core_generate(comfy, tiny_pipeline):
    from easyanimate_core.media import read_image

    entry = run_ok(comfy, graph("inpaint", conditioning=image_to_video(end="end.png"), save="latent"))
    core = tiny_pipeline("inpaint").generate(
        PROMPT, NEGATIVE, height=TEST_HEIGHT, width=TEST_WIDTH, num_frames=5, num_inference_steps=2, seed=43,
        start_image=read_image(comfy.input_dir / "start.png"), end_image=read_image(comfy.input_dir / "end.png"))
    assert (saved_latent(comfy, entry) - core.latents).abs().max() <= 1e-5


def test_video_to_video_latent_equals_core_generate(comfy, tiny_pipeline):
    from easyanimate_core.media import read_frames

    # Frames from the VideoHelperSuite stand-in (imageio, as read_frames): ComfyUI 0.33's own LoadVideo decodes
    # yuv420p h264 straight to float32 (off the uint8 grid, colours converted by its PyAV), so comparing with
    # it would compare two video decoders rather than our nodes.
    encode = {"31": {"class_type": "VHS_LoadVideo",
                     "inputs": {"video": "clip.mp4", "force_rate": 0, "custom_width": 0, "custom_height": 0,
                                "frame_load_cap": 0, "skip_first_frames": 0, "select_every_nth": 1}},
              "30": {"class_type": "EasyAnimateVAEEncode",
                     "inputs": {"vae": ["1", 2], "pixels": ["31", 0], "size": "input"}}}
    entry = run_ok(comfy, graph("t2v", steps=4, denoise=0.5, latent=encode, save="latent"))
    assert "the first 9 are used" in node_texts(entry, "30")[0]
    video = read_frames(comfy.input_dir / "clip.mp4")
    core = tiny_pipeline("t2v").generate(PROMPT, NEGATIVE, height=TEST_HEIGHT, width=TEST_WIDTH, num_frames=9,
                                         num_inference_steps=4, seed=43, video=video, strength=0.5)
    assert (saved_latent(comfy, entry) - core.latents).abs().max() <= 1e-5


def test_control_and_canny_make_a_video(comfy):
    nodes = load_video_frames("21", "clip.mp4")
    nodes["23"] = {"class_type": "EasyAnimateCannyEdges",
                   "inputs": {"images": ["21", 0], "low_threshold": 100, "high_threshold": 200}}
    nodes["20"] = {"class_type": "EasyAnimateControlVideo",
                   "inputs": {"vae": ["1", 2], "control_video": ["23", 0], "size": "explicit",
                              "width": TEST_WIDTH, "height": TEST_HEIGHT}}
    entry = run_ok(comfy, graph("control", conditioning=nodes))
    assert read_video(saved_video(comfy, entry))[:2] == (9, (TEST_WIDTH, TEST_HEIGHT))
    assert "control_video has 10 frames; EasyAnimate takes 4k+1 frames, so the first 9 are used" in \
        node_texts(entry, "20")[0]


def test_region_inpaint_with_a_mask_runs(comfy):
    nodes = load_video_frames("21", "clip.mp4")
    nodes["24"] = {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": TEST_WIDTH, "height": TEST_HEIGHT}}
    nodes["20"] = {"class_type": "EasyAnimateVideoInpaint",
                   "inputs": {"vae": ["1", 2], "video": ["21", 0], "mask": ["24", 0], "size": "explicit",
                              "width": TEST_WIDTH, "height": TEST_HEIGHT}}
    entry = run_ok(comfy, graph("inpaint", conditioning=nodes, denoise=0.7, steps=3))
    frames, size, _ = read_video(saved_video(comfy, entry))
    assert frames == INPUT_VIDEO_FRAMES - 1 and size == (TEST_WIDTH, TEST_HEIGHT)


def test_resolution_bucket_node_gives_the_trained_size(comfy):
    prompt = load_image("1", "start.png")
    prompt["2"] = {"class_type": "EasyAnimateResolutionBucket", "inputs": {"image": ["1", 0], "base_resolution": "768"}}
    prompt["3"] = {"class_type": "EmptyImage", "inputs": {"width": ["2", 0], "height": ["2", 1], "batch_size": 1,
                                                          "color": 0}}
    prompt["4"] = {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "bucket"}}
    entry = run_ok(comfy, prompt)
    assert node_texts(entry, "2") == ["1008x576"]  # 112x64 is ratio 0.57: bucket 384x672 at 512, x1.5


def test_stacked_loras_equal_core_set_loras_and_leave_the_base_model_alone(comfy, tiny_pipeline):
    loras = [(TINY_LORAS["kohya"], 0.7), (TINY_LORAS["peft"], -0.4)]
    entry = run_ok(comfy, graph("t2v", seed=3, loras=loras, save="latent"))
    assert "EasyAnimateV5-tiny-zh-InP-MPS.safetensors @ 0.7" in node_texts(entry, "40")[0]
    assert "tiny-style-peft.safetensors @ -0.4" in node_texts(entry, "4")[-1]
    pipe = tiny_pipeline("t2v")
    folder = comfy.base / "models" / "loras"
    try:
        pipe.set_loras([(folder / name, strength) for name, strength in loras])
        with_lora = pipe.generate(PROMPT, NEGATIVE, height=TEST_HEIGHT, width=TEST_WIDTH, num_frames=5,
                                  num_inference_steps=2, seed=3)
    finally:
        pipe.set_loras([])
    base = pipe.generate(PROMPT, NEGATIVE, height=TEST_HEIGHT, width=TEST_WIDTH, num_frames=5,
                         num_inference_steps=2, seed=3)
    ours = saved_latent(comfy, entry)
    assert (ours - with_lora.latents).abs().max() <= 1e-5
    assert (ours - base.latents).abs().max() > 1e-3, "the LoRA had no effect"
    # The same loaded model without the LoRA nodes is the base model again.
    entry = run_ok(comfy, graph("t2v", seed=3, save="latent"))
    assert (saved_latent(comfy, entry) - base.latents).abs().max() <= 1e-5


def test_lora_errors_name_the_file_and_the_cause(comfy):
    error = refused_or_error(comfy, graph("t2v", loras=[("missing.safetensors", 0.7)]), "lora_name",
                             "missing.safetensors")
    if error is not None:
        assert error["node_type"] == "EasyAnimateLoraLoader"
        assert "LoRA 'missing.safetensors' was not found in" in error["exception_message"]
        assert str(comfy.base / "models" / "loras") in error["exception_message"]
    error = run_error(comfy, graph("t2v", loras=[(TINY_LORAS["v51"], 0.7)]))
    assert error["node_type"] == "EasyAnimateLoraLoader"
    assert "matches no layer of the model" in error["exception_message"] and "V5.1" in error["exception_message"]


# ---------------------------------------------------------------------------------------------- ComfyUI services
def test_progress_and_previews_are_sent_for_every_step(comfy):
    progress, previews = [], []

    def on_message(event):
        if isinstance(event, bytes):
            previews.append(b"\xff\xd8" in event[:64])  # a JPEG preview frame
        elif node_progress(event, "4"):
            progress.append(node_progress(event, "4"))

    comfy.watch(graph("t2v", steps=8, seed=11), "progress-test", on_message)
    previews = sum(previews)
    values = [v for v, _ in progress]
    assert all(m == 8 for _, m in progress) and values, progress
    if comfy.version == "0.3.75":
        assert values[-8:] == list(range(1, 9))
    else:  # 0.33's ProgressBar sends the first and last step and throttles the rest to one per 100 ms
        assert values[0] == 1 and values[-1] == 8 and values == sorted(set(values)), values
    # The first step always sends a preview; later ones are limited to a share of the sampling time.
    assert previews >= 1, "no preview frame was sent"


def test_cancel_mid_sampling_leaves_the_model_as_it_was(comfy, tiny_pipeline):
    entry = comfy.watch(graph("t2v", steps=200, frames=9, seed=5), "cancel-test",
                        lambda event: interrupt_once(comfy, event, "4", at_step=2))
    kinds = [name for name, _ in entry["status"]["messages"]]
    assert "execution_interrupted" in kinds, kinds
    # The next run from the same loaded model equals a clean core run.
    entry = run_ok(comfy, graph("t2v", seed=5, save="latent"))
    core = tiny_pipeline("t2v").generate(PROMPT, NEGATIVE, height=TEST_HEIGHT, width=TEST_WIDTH, num_frames=5,
                                         num_inference_steps=2, seed=5)
    assert (saved_latent(comfy, entry) - core.latents).abs().max() <= 1e-5


def test_loaded_model_is_reused_across_runs_with_the_same_settings(comfy):
    loading = f"loading {comfy.models_dir / TINY_MODEL_NAMES['t2v']} "
    run_ok(comfy, graph("t2v", precision="auto", steps=1, seed=1))
    loads = comfy.log().count(loading)
    # A changed loader input makes ComfyUI run the loader again; auto is fp32 on the CPU, so nothing is re-read.
    entry = run_ok(comfy, graph("t2v", precision="fp32", steps=1, seed=1))
    assert "float32" in node_texts(entry, "1")[0]
    assert comfy.log().count(loading) == loads >= 1


def test_memory_modes_on_the_loader_keep_the_result(comfy):
    """Offload and block swap move weights, not numbers: the same latents bit for bit; fp8 stays close."""
    def latents(**loader):
        entry = run_ok(comfy, graph("t2v", seed=3, save="latent", **loader))
        return saved_latent(comfy, entry), node_texts(entry, "1")

    plain, texts = latents(memory_mode="gpu")
    assert texts[1].startswith("memory: everything resident [gpu, requested]")
    offloaded, _ = latents(memory_mode="offload")
    swapped, texts = latents(memory_mode="block_swap", swap_blocks=1)
    assert "1 of 2 blocks swapped [block_swap, requested]" in texts[1]
    assert torch.equal(offloaded, plain) and torch.equal(swapped, plain)
    fp8, texts = latents(memory_mode="fp8_block_swap", swap_blocks=2)
    assert texts[1].startswith("memory: fp8 + offload + 2 of 2 blocks swapped")
    relative = ((fp8 - plain).norm() / plain.norm()).item()
    assert 0 < relative < 0.08, relative
    auto, texts = latents()  # on the CPU auto keeps everything resident
    assert torch.equal(auto, plain) and "everything stays resident" in texts[1]


def test_missing_attention_backend_is_named_before_loading(comfy):
    loading = f"loading {comfy.models_dir / TINY_MODEL_NAMES['t2v']} "
    loads = comfy.log().count(loading)
    message = run_error(comfy, graph("t2v", attention="flash", steps=1))["exception_message"]
    assert "attention backend 'flash'" in message and "'sdpa'" in message
    assert comfy.log().count(loading) == loads


# ---------------------------------------------------------------------------------------------- bad input
def test_missing_model_folder_names_the_tree_and_the_download(comfy):
    error = refused_or_error(comfy, graph("inpaint", model_name="EasyAnimateV5-12b-zh-InP"), "model_name",
                             "EasyAnimateV5-12b-zh-InP")
    if error is None:
        return  # 0.33 refused the name before our loader ran (the loader lists only what is there)
    message = error["exception_message"]
    assert error["node_type"] == "EasyAnimateModelLoader"
    assert "'EasyAnimateV5-12b-zh-InP' was not found" in message and str(comfy.models_dir) in message
    assert "transformer/config.json" in message and "tokenizer_2/spiece.model" in message
    assert (f"hf download alibaba-pai/EasyAnimateV5-12b-zh-InP --local-dir "
            f"{comfy.models_dir / 'EasyAnimateV5-12b-zh-InP'}") in message


def test_half_downloaded_folder_names_the_missing_file(comfy):
    broken = comfy.models_dir / "EasyAnimateV5-7b-zh"
    shutil.copytree(comfy.models_dir / TINY_MODEL_NAMES["t2v"], broken)
    (broken / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    message = run_error(comfy, graph("t2v", model_name="EasyAnimateV5-7b-zh"))["exception_message"]
    assert f"missing {broken / 'vae' / 'diffusion_pytorch_model.safetensors'}" in message
    assert f"hf download alibaba-pai/EasyAnimateV5-7b-zh --local-dir {broken}" in message


def test_truncated_safetensors_is_named(comfy):
    broken = comfy.models_dir / "tiny-truncated"
    shutil.copytree(comfy.models_dir / TINY_MODEL_NAMES["t2v"], broken)
    weights = broken / "transformer" / "diffusion_pytorch_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    message = run_error(comfy, graph("t2v", model_name="tiny-truncated"))["exception_message"]
    assert str(weights) in message and "truncated" in message


def test_control_video_on_an_inp_model_says_which_model_to_load(comfy):
    error = run_error(comfy, graph("inpaint", conditioning=control_video()))
    assert error["node_type"] == "EasyAnimateSampler"
    assert "InP" in error["exception_message"] and "EasyAnimateV5-12b-zh-Control" in error["exception_message"]


def test_start_image_on_a_t2v_model_says_which_model_to_load(comfy):
    error = run_error(comfy, graph("t2v", conditioning=image_to_video()))
    assert error["node_type"] == "EasyAnimateSampler"
    assert "text-to-video (T2V)" in error["exception_message"]
    assert "EasyAnimateV5-12b-zh-InP" in error["exception_message"]


def test_end_image_of_another_size_is_resized_and_the_node_says_so(comfy):
    entry = run_ok(comfy, graph("inpaint", conditioning=image_to_video(end="end_small.png")))
    assert "end_image is 48x40, the start image 112x64: both are resized to 112x64" in node_texts(entry, "20")[0]
    assert read_video(saved_video(comfy, entry))[:2] == (5, (TEST_WIDTH, TEST_HEIGHT))


def test_frame_count_not_4k_plus_1_is_rounded_and_said(comfy):
    entry = run_ok(comfy, graph("control", conditioning=control_video()))
    assert "the first 9 are used" in node_texts(entry, "20")[0]
    assert read_video(saved_video(comfy, entry))[0] == 9


def test_unknown_sampler_and_denoise_without_a_video_are_refused(comfy):
    error = refused_or_error(comfy, graph("t2v", sampler="LCM"), "sampler_name", "LCM")
    if error is not None:
        assert "sampler_name must be one of DDIM, Euler, Euler A, DPM++, PNDM; got 'LCM'" in \
            error["exception_message"]
    error = run_error(comfy, graph("t2v", denoise=0.6))
    assert "connect EasyAnimate VAE Encode" in error["exception_message"]
