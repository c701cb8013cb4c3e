"""EasyAnimate as a native ComfyUI MODEL, inside real ComfyUI 0.3.75 and 0.33.0 servers.

KSampler against our exact sampler at the same seed noise, ComfyUI's LoRA loader against our LoRA node,
EasyCache, context windows, TorchCompileModel, concat conditioning, and the refusals of foreign inputs.
Relative L2 distances are printed as `[native] ...` lines (run with -s to see them).
"""
from __future__ import annotations

import re

import pytest
import torch
from safetensors.torch import save_file

from comfy_media import TEST_HEIGHT, TEST_WIDTH, read_video
from comfy_server import node_texts
from conftest import TINY_LORAS, TINY_MODEL_NAMES
from test_comfy_nodes import NEGATIVE, PROMPT, load_image, run_error, run_ok, saved_latent, saved_video

NATIVE_NODES = {"EasyAnimateToComfyModel", "EasyAnimateTextEncodeConditioning", "EasyAnimateVideoConditioning"}


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def base_nodes(kind="t2v", frames=5, memory_mode="auto") -> dict:
    """Loader, both text encoders (ours and CONDITIONING), an empty latent and the converted MODEL."""
    return {
        "1": {"class_type": "EasyAnimateModelLoader",
              "inputs": {"model_name": TINY_MODEL_NAMES[kind], "precision": "auto", "memory_mode": memory_mode,
                         "swap_blocks": 0, "attention": "sdpa", "compile": False}},
        "2": {"class_type": "EasyAnimateTextEncode",
              "inputs": {"text_encoders": ["1", 1], "prompt": PROMPT, "negative_prompt": NEGATIVE}},
        "3": {"class_type": "EasyAnimateEmptyLatent",
              "inputs": {"width": TEST_WIDTH, "height": TEST_HEIGHT, "length": frames}},
        "10": {"class_type": "EasyAnimateToComfyModel", "inputs": {"model": ["1", 0]}},
        "11": {"class_type": "EasyAnimateTextEncodeConditioning",
               "inputs": {"text_encoders": ["1", 1], "prompt": PROMPT, "negative_prompt": NEGATIVE}},
    }


def ksampler(model=("10", 0), positive=("11", 0), negative=("11", 1), latent=("3", 0), *, seed=43, steps=4,
             cfg=6.0, sampler="ddim", scheduler="simple", denoise=1.0) -> dict:
    return {"class_type": "KSampler",
            "inputs": {"model": list(model), "positive": list(positive), "negative": list(negative),
                       "latent_image": list(latent), "seed": seed, "steps": steps, "cfg": cfg, "sampler_name": sampler,
                       "scheduler": scheduler, "denoise": denoise}}


def our_sampler(model=("1", 0), latent=("3", 0), *, seed=43, steps=4, cfg=6.0, sampler="DDIM", cond=None) -> dict:
    inputs = {"model": list(model), "positive": ["2", 0], "negative": ["2", 1], "latent_image": list(latent),
              "seed": seed, "steps": steps, "cfg": cfg, "sampler_name": sampler, "denoise": 1.0}
    if cond is not None:
        inputs["video_conditioning"] = list(cond)
    return {"class_type": "EasyAnimateSampler", "inputs": inputs}


def save_latent(source: str, name: str) -> dict:
    return {"class_type": "SaveLatent", "inputs": {"samples": [source, 0], "filename_prefix": f"latents/{name}"}}


def run_and_compare(comfy, prompt: dict, first: tuple[str, str], second: tuple[str, str], label: str,
                    timeout: float = 300) -> float:
    """Save the latents of two sampler nodes ((node id, file name) each), run the graph and print and return the
    relative L2 between them."""
    prompt["30"], prompt["31"] = save_latent(*first), save_latent(*second)
    entry = run_ok(comfy, prompt, timeout=timeout)
    distance = rel_l2(saved_latent(comfy, entry, "30"), saved_latent(comfy, entry, "31"))
    print(f"\n[native] ComfyUI {comfy.version}: {label}: relative L2 {distance:.2e}")
    return distance


def decode_and_save(source: str, prefix: str) -> dict:
    return {"50": {"class_type": "EasyAnimateVAEDecode",
                   "inputs": {"vae": ["1", 2], "samples": [source, 0], "tiling": False, "tile_size": 384}},
            "51": {"class_type": "CreateVideo", "inputs": {"images": ["50", 0], "fps": 8.0}},
            "7": {"class_type": "SaveVideo", "inputs": {"video": ["51", 0], "filename_prefix": prefix,
                                                        "format": "mp4", "codec": "h264"}}}


# ---------------------------------------------------------------------------------------------- schema
def test_native_nodes_are_registered_with_tooltips(comfy):
    info = comfy.object_info()
    assert NATIVE_NODES <= set(info)
    for node_id in NATIVE_NODES:
        node = info[node_id]
        assert node["category"].startswith("EasyAnimate") and node["description"]
        inputs = {**node["input"]["required"], **node["input"].get("optional", {})}
        assert all(options.get("tooltip") for _, options in inputs.values()), node_id
    assert info["EasyAnimateToComfyModel"]["output"] == ["MODEL"]
    assert info["EasyAnimateTextEncodeConditioning"]["output"] == ["CONDITIONING", "CONDITIONING"]
    assert info["EasyAnimateVideoConditioning"]["output"] == ["CONDITIONING", "CONDITIONING", "LATENT"]


# ---------------------------------------------------------------------------------------------- schedules
@pytest.mark.parametrize("ours,theirs,bound", [("DDIM", "ddim", 1e-3), ("Euler", "euler", 1e-3)])
def test_ksampler_matches_our_sampler_at_the_same_seed(comfy, ours, theirs, bound):
    """KSampler (sampler, 'simple' scheduler) vs our sampler, same seed, same steps, cfg 6: the final latents.

    'simple' takes every (1000/steps)-th sigma from the top, i.e. the timesteps 999, 999-1000/steps, ... of the
    V5 scheduler's 'trailing' spacing. ComfyUI's 'ddim' sampler is Euler in its sigma space, which is what
    DDIM (eta 0) is. Differences: ComfyUI caps the zero-terminal-SNR top sigma at 4518.8 (alpha_bar 4.9e-8)
    where diffusers' DDIM uses alpha_bar = 0 and diffusers' Euler 4096 (alpha_bar 2**-24); and ComfyUI steps the
    latent in its variance-exploding form (x = latent * sqrt(1 + sigma**2), about 4500x the latent at the first
    step) in float32, whose rounding there alone is of the order of 1e-4 of the result.
    """
    prompt = base_nodes()
    prompt["20"] = ksampler(seed=7, sampler=theirs)
    prompt["21"] = our_sampler(seed=7, sampler=ours)
    prompt["30"], prompt["31"] = save_latent("20", "ksampler"), save_latent("21", "ours")
    entry = run_ok(comfy, prompt)
    native, exact = saved_latent(comfy, entry, "30"), saved_latent(comfy, entry, "31")
    distance = rel_l2(native, exact)
    print(f"\n[native] ComfyUI {comfy.version}: KSampler {theirs}/simple vs our {ours}, 4 steps cfg 6: "
          f"relative L2 {distance:.2e}")
    assert native.shape == exact.shape == (1, 16, 2, TEST_HEIGHT // 8, TEST_WIDTH // 8)
    assert distance < bound


# ---------------------------------------------------------------------------------------------- LoRA
@pytest.mark.parametrize("layout", ["kohya", "peft"])
def test_comfyui_lora_loader_equals_our_lora_node(comfy, layout):
    """LoraLoaderModelOnly on our MODEL vs the EasyAnimate LoRA node before the conversion, both through KSampler
    ddim/simple (the same schedule): equal to 1e-5. Against our own sampler (DDIM, the diffusers schedule) the
    distance is that of the base model's schedules (see the test above)."""
    lora = TINY_LORAS[layout]
    prompt = base_nodes()
    prompt["12"] = {"class_type": "LoraLoaderModelOnly",
                    "inputs": {"model": ["10", 0], "lora_name": lora, "strength_model": 0.7}}
    prompt["13"] = {"class_type": "EasyAnimateLoraLoader", "inputs": {"model": ["1", 0], "lora_name": lora,
                                                                      "strength": 0.7}}
    prompt["14"] = {"class_type": "EasyAnimateToComfyModel", "inputs": {"model": ["13", 0]}}
    prompt["20"] = ksampler(model=("12", 0), seed=5)
    prompt["21"] = ksampler(model=("14", 0), seed=5)
    prompt["22"] = our_sampler(model=("13", 0), seed=5)
    prompt["23"] = ksampler(seed=5)   # the base model again afterwards: the LoRA must be gone
    for node, source in (("30", "20"), ("31", "21"), ("32", "22"), ("33", "23")):
        prompt[node] = save_latent(source, f"lora_{layout}_{source}")
    before = comfy.log()
    entry = run_ok(comfy, prompt)
    comfy_lora, our_lora, our_sampler_lora, base = (saved_latent(comfy, entry, n) for n in ("30", "31", "32", "33"))
    same_schedule, exact = rel_l2(comfy_lora, our_lora), rel_l2(comfy_lora, our_sampler_lora)
    print(f"\n[native] ComfyUI {comfy.version}: LoraLoaderModelOnly ({layout}) vs EasyAnimate LoRA, both KSampler "
          f"ddim/simple: relative L2 {same_schedule:.2e}; vs EasyAnimate LoRA + our DDIM: {exact:.2e}; "
          f"LoRA effect {rel_l2(comfy_lora, base):.2e}")
    assert rel_l2(comfy_lora, base) > 1e-2, "the LoRA changed nothing: its keys were not mapped"
    assert same_schedule < 1e-5
    assert exact < 1e-3
    assert "lora key not loaded" not in comfy.log()[len(before):]


# ---------------------------------------------------------------------------------------------- core extensions
def test_easycache_skips_steps_on_our_model(comfy):
    prompt = base_nodes()
    prompt["12"] = {"class_type": "EasyCache", "inputs": {"model": ["10", 0], "reuse_threshold": 3.0,
                                                          "start_percent": 0.1, "end_percent": 0.95,
                                                          "verbose": False}}
    prompt["20"] = ksampler(model=("12", 0), steps=10, sampler="euler")
    prompt.update(decode_and_save("20", "native/easycache"))
    before = comfy.log()
    entry = run_ok(comfy, prompt)
    lines = re.findall(r"EasyCache - skipped (\d+)/(\d+) steps", comfy.log()[len(before):])
    print(f"\n[native] ComfyUI {comfy.version}: EasyCache on our MODEL: skipped {lines[-1][0]}/{lines[-1][1]} steps")
    assert lines and int(lines[-1][0]) > 0
    assert read_video(saved_video(comfy, entry))[:2] == (5, (TEST_WIDTH, TEST_HEIGHT))


@pytest.mark.parametrize("kind", ["t2v", "inpaint"])
def test_context_windows_make_a_video_twice_the_window(comfy, kind):
    """WAN Context Windows (dim 2) over our MODEL: windows of 2 latent frames (5 frames), a video of 4 (13 frames).

    With the InP model the start image's concat latents are sliced per window along the frame axis."""
    prompt = base_nodes(kind, frames=13)
    prompt["12"] = {"class_type": "WanContextWindowsManual",
                    "inputs": {"model": ["10", 0], "context_length": 5, "context_overlap": 1,
                               "context_schedule": "standard_static", "context_stride": 1, "closed_loop": False,
                               "fuse_method": "pyramid"}}
    if comfy.version != "0.3.75":  # inputs added since
        prompt["12"]["inputs"].update(freenoise=False, retain_first_frame=False, split_conds_to_windows=False)
    latent = ("3", 0)
    positive, negative = ("11", 0), ("11", 1)
    if kind == "inpaint":
        prompt.update(load_image("21", "start.png"))
        prompt["14"] = {"class_type": "EasyAnimateVideoConditioning",
                        "inputs": {"model": ["1", 0], "positive": ["11", 0], "negative": ["11", 1], "length": 13,
                                   "size": "explicit", "width": TEST_WIDTH, "height": TEST_HEIGHT, "seed": 43,
                                   "start_image": ["21", 0]}}
        latent, positive, negative = ("14", 2), ("14", 0), ("14", 1)
    prompt["20"] = ksampler(model=("12", 0), positive=positive, negative=negative, latent=latent, steps=2)
    prompt.update(decode_and_save("20", f"native/context_{kind}"))
    entry = run_ok(comfy, prompt)
    frames, size, _ = read_video(saved_video(comfy, entry))
    print(f"\n[native] ComfyUI {comfy.version}: context windows of 5 frames ({kind}): a video of {frames} frames")
    assert (frames, size) == (13, (TEST_WIDTH, TEST_HEIGHT))


def test_torch_compile_model_runs(comfy):
    prompt = base_nodes()
    prompt["12"] = {"class_type": "TorchCompileModel", "inputs": {"model": ["10", 0], "backend": "inductor"}}
    prompt["20"] = ksampler(model=("12", 0), steps=2, cfg=1.0)
    prompt["21"] = ksampler(steps=2, cfg=1.0)
    distance = run_and_compare(comfy, prompt, ("20", "compiled"), ("21", "eager"),
                               "TorchCompileModel (inductor, CPU) vs eager", timeout=900)
    assert distance < 1e-4


# ---------------------------------------------------------------------------------------------- concat conditioning
def test_video_conditioning_with_ksampler_equals_our_image_to_video(comfy):
    """InP start + end image through positive/negative (Wan-style) + KSampler ddim/simple vs our Image to Video +
    our DDIM at the same seed."""
    prompt = base_nodes("inpaint")
    prompt.update(load_image("21", "start.png"))
    prompt.update(load_image("22", "end.png"))
    prompt["14"] = {"class_type": "EasyAnimateVideoConditioning",
                    "inputs": {"model": ["1", 0], "positive": ["11", 0], "negative": ["11", 1], "length": 5,
                               "size": "explicit", "width": TEST_WIDTH, "height": TEST_HEIGHT, "seed": 9,
                               "start_image": ["21", 0], "end_image": ["22", 0]}}
    prompt["15"] = {"class_type": "EasyAnimateImageToVideo",
                    "inputs": {"vae": ["1", 2], "start_image": ["21", 0], "end_image": ["22", 0], "length": 5,
                               "size": "explicit", "width": TEST_WIDTH, "height": TEST_HEIGHT}}
    prompt["20"] = ksampler(positive=("14", 0), negative=("14", 1), latent=("14", 2), seed=9)
    prompt["21b"] = our_sampler(latent=("15", 1), seed=9, cond=("15", 0))
    distance = run_and_compare(comfy, prompt, ("20", "i2v_native"), ("21b", "i2v_ours"),
                               "InP first+last frame, KSampler vs ours")
    assert distance < 1e-3


def test_ksampler_output_decodes_with_our_vae_decode(comfy):
    prompt = base_nodes(frames=9)
    prompt["20"] = ksampler(steps=2)
    prompt.update(decode_and_save("20", "native/t2v"))
    entry = run_ok(comfy, prompt)
    assert read_video(saved_video(comfy, entry))[:2] == (9, (TEST_WIDTH, TEST_HEIGHT))


# ---------------------------------------------------------------------------------------------- refusals
def test_a_four_channel_latent_names_what_to_connect(comfy):
    save_file({"latent_tensor": torch.randn(1, 4, TEST_HEIGHT // 8, TEST_WIDTH // 8)},
              str(comfy.input_dir / "sd15.latent"))
    prompt = base_nodes()
    prompt["40"] = {"class_type": "LoadLatent", "inputs": {"latent": "sd15.latent"}}
    prompt["20"] = ksampler(latent=("40", 0), steps=1)
    prompt["30"] = save_latent("20", "refused")
    error = run_error(comfy, prompt)
    assert "4-channel latent of another model family" in error["exception_message"]
    assert "EasyAnimate Empty Video Latent" in error["exception_message"]


def test_a_clip_conditioning_of_another_family_names_our_text_encoder(comfy):
    """Core conditioning nodes that keep the entries work; a CLIP text conditioning of another model family
    (ComfyUI's LotusConditioning: SD 2's CLIP-H states of an empty prompt, no model needed) is refused."""
    prompt = base_nodes()
    prompt["12"] = {"class_type": "ConditioningSetTimestepRange",
                    "inputs": {"conditioning": ["11", 0], "start": 0.0, "end": 1.0}}
    prompt["20"] = ksampler(positive=("12", 0), steps=1)
    prompt["30"] = save_latent("20", "ok_range")
    run_ok(comfy, prompt)
    prompt["13"] = {"class_type": "LotusConditioning", "inputs": {}}
    prompt["20"] = ksampler(positive=("13", 0), steps=1)
    error = run_error(comfy, prompt)
    assert "not from EasyAnimate" in error["exception_message"]
    assert "EasyAnimate Text Encode (Conditioning)" in error["exception_message"]


def test_image_conditioning_on_a_t2v_model_says_which_model_to_load(comfy):
    prompt = base_nodes("t2v")
    prompt.update(load_image("21", "start.png"))
    prompt["14"] = {"class_type": "EasyAnimateVideoConditioning",
                    "inputs": {"model": ["1", 0], "positive": ["11", 0], "negative": ["11", 1], "length": 5,
                               "size": "explicit", "width": TEST_WIDTH, "height": TEST_HEIGHT, "seed": 43,
                               "start_image": ["21", 0]}}
    prompt["20"] = ksampler(positive=("14", 0), negative=("14", 1), latent=("14", 2), steps=1)
    prompt["30"] = save_latent("20", "refused_t2v")
    error = run_error(comfy, prompt)
    assert "Load an InP model" in error["exception_message"]


def test_our_sampler_after_ksampler_on_the_same_model_is_unchanged(comfy, tiny_pipeline):
    """The MODEL shares the loaded weights: our exact sampler gives the core result after KSampler + ComfyUI LoRA."""
    prompt = base_nodes()
    prompt["12"] = {"class_type": "LoraLoaderModelOnly",
                    "inputs": {"model": ["10", 0], "lora_name": TINY_LORAS["kohya"], "strength_model": 1.0}}
    prompt["20"] = ksampler(model=("12", 0), steps=2)
    prompt["30"] = save_latent("20", "first")
    run_ok(comfy, prompt)
    prompt = base_nodes()
    prompt["21"] = our_sampler(seed=3, steps=2)
    prompt["31"] = save_latent("21", "after")
    entry = run_ok(comfy, prompt)
    core = tiny_pipeline("t2v").generate(PROMPT, NEGATIVE, height=TEST_HEIGHT, width=TEST_WIDTH, num_frames=5,
                                         num_inference_steps=2, seed=3)
    assert (saved_latent(comfy, entry, "31") - core.latents).abs().max() <= 1e-5
    assert node_texts(entry, "21")


def test_fp8_weights_refuse_comfyui_lora_patches_and_take_our_lora_node(comfy):
    prompt = base_nodes(memory_mode="fp8")
    prompt["12"] = {"class_type": "LoraLoaderModelOnly",
                    "inputs": {"model": ["10", 0], "lora_name": TINY_LORAS["kohya"], "strength_model": 0.7}}
    prompt["20"] = ksampler(model=("12", 0), steps=1)
    prompt["30"] = save_latent("20", "fp8_refused")
    error = run_error(comfy, prompt)
    assert "fp8 weights" in error["exception_message"] and "EasyAnimate LoRA node" in error["exception_message"]
    prompt = base_nodes(memory_mode="fp8")
    prompt["13"] = {"class_type": "EasyAnimateLoraLoader", "inputs": {"model": ["1", 0],
                                                                      "lora_name": TINY_LORAS["kohya"], "strength": 0.7}}
    prompt["14"] = {"class_type": "EasyAnimateToComfyModel", "inputs": {"model": ["13", 0]}}
    prompt["20"] = ksampler(model=("14", 0), steps=2)
    prompt["21"] = our_sampler(model=("13", 0), steps=2)
    distance = run_and_compare(comfy, prompt, ("20", "fp8_lora_native"), ("21", "fp8_lora_ours"),
                               "fp8 + EasyAnimate LoRA, KSampler vs ours")
    assert distance < 1e-3


def test_ksampler_sends_comfyuis_own_latent_previews(comfy):
    """ComfyUI's latent2rgb previews (the server runs with --preview-method auto) use our fitted factors."""
    import io

    from PIL import Image

    prompt = base_nodes()
    prompt["20"] = ksampler(steps=4, seed=2)
    prompt["30"] = save_latent("20", "previewed")
    previews = []

    def on_message(event):
        start = event.find(b"\xff\xd8") if isinstance(event, bytes) else -1
        if 0 <= start < 64:
            previews.append(Image.open(io.BytesIO(event[start:])))

    comfy.watch(prompt, "native-preview-test", on_message)
    assert len(previews) >= 4, f"{len(previews)} preview frames for 4 steps"
    # ComfyUI's latent2rgb image of the first latent frame, enlarged to 512 px: the video's aspect ratio
    width, height = previews[-1].size
    assert width == 512 and abs(width / height - TEST_WIDTH / TEST_HEIGHT) < 0.01
