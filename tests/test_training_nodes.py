"""Training nodes inside a real ComfyUI server (0.3.75 and 0.33 through the `comfy` fixture)."""
from __future__ import annotations


from safetensors import safe_open

from comfy_media import TEST_HEIGHT, TEST_WIDTH
from comfy_server import interrupt_once, node_progress, node_texts
from conftest import TINY_MODEL_NAMES
from test_comfy_nodes import NEGATIVE, PROMPT, run_error, run_ok, saved_latent
from test_training import write_style_images


def train_graph(dataset_inputs: dict, *, steps=3, output_name="node_style", extra=None, sample=True) -> dict:
    prompt = {
        "1": {"class_type": "EasyAnimateModelLoader",
              "inputs": {"model_name": TINY_MODEL_NAMES["t2v"], "precision": "auto", "memory_mode": "auto",
                         "swap_blocks": 0, "attention": "sdpa", "compile": False}},
        "10": {"class_type": "EasyAnimateTrainingDataset",
               "inputs": dict({"folder": "", "resolution": 64, "max_frames": 1, "image_resolution": 64, "repeat": 1,
                               "missing_captions": "refuse"}, **dataset_inputs)},
        "11": {"class_type": "EasyAnimateTrainLoRA",
               "inputs": dict({"model": ["1", 0], "text_encoders": ["1", 1], "vae": ["1", 2], "dataset": ["10", 0],
                               "steps": steps, "learning_rate": 1e-3, "rank": 4, "alpha": 4.0, "seed": 7,
                               "targets": "all", "gradient_checkpointing": True, "output_name": output_name,
                               "save_every": 0, "warmup_steps": 0, "caption_dropout": 0.1, "trigger_words": "orange",
                               "resume": False, "rebuild_cache": False}, **(extra or {}))},
        "12": {"class_type": "PreviewImage", "inputs": {"images": ["11", 2]}},
    }
    if sample:
        prompt.update({
            "2": {"class_type": "EasyAnimateTextEncode",
                  "inputs": {"text_encoders": ["1", 1], "prompt": PROMPT, "negative_prompt": NEGATIVE}},
            "3": {"class_type": "EasyAnimateEmptyLatent", "inputs": {"width": TEST_WIDTH, "height": TEST_HEIGHT,
                                                                      "length": 5}},
            "4": {"class_type": "EasyAnimateSampler",
                  "inputs": {"model": ["11", 0], "positive": ["2", 0], "negative": ["2", 1], "latent_image": ["3", 0],
                             "seed": 3, "steps": 2, "cfg": 6.0, "sampler_name": "DDIM", "denoise": 1.0}},
            "9": {"class_type": "SaveLatent", "inputs": {"samples": ["4", 0], "filename_prefix": "latents/train"}},
        })
    return prompt


def test_train_then_sample_with_the_new_lora(comfy, tiny_pipeline):
    write_style_images(comfy.input_dir / "style_data", n=3)
    entry = run_ok(comfy, train_graph({"folder": "style_data"}))
    lora = comfy.base / "models" / "loras" / "node_style.safetensors"
    with safe_open(str(lora), "pt") as f:
        meta = f.metadata()
        assert meta["ss_steps"] == "3" and meta["trigger_words"] == "orange" and meta["ss_num_train_images"] == "3"
        assert f.get_tensor("lora_unet__proj_out.lora_up.weight").abs().max() > 0, "the LoRA was not trained"
    assert "saved node_style.safetensors" in node_texts(entry, "11")[0]
    assert (comfy.input_dir / "style_data" / ".easyanimate_cache" / "manifest.json").is_file()
    assert len((comfy.base / "models" / "loras" / "node_style.csv").read_text().splitlines()) == 4
    assert entry["outputs"]["12"]["images"], "the loss curve image was not produced"

    # The sampler used the new LoRA: the same as the core with that file.
    pipe = tiny_pipeline("t2v")
    try:
        pipe.set_loras([(lora, 1.0)])
        core = pipe.generate(PROMPT, NEGATIVE, height=TEST_HEIGHT, width=TEST_WIDTH, num_frames=5,
                             num_inference_steps=2, seed=3)
    finally:
        pipe.set_loras([])
    assert (saved_latent(comfy, entry) - core.latents).abs().max() <= 1e-5

    # IMAGE batch + captions, no folder.
    prompt = train_graph({"images": ["13", 0], "captions": "a gradient"}, steps=2, output_name="from_images",
                         sample=False)
    prompt["13"] = {"class_type": "LoadImage", "inputs": {"image": "start.png"}}
    run_ok(comfy, prompt)
    with safe_open(str(comfy.base / "models" / "loras" / "from_images.safetensors"), "pt") as f:
        assert f.metadata()["ss_steps"] == "2"


def test_training_errors_are_clear(comfy):
    write_style_images(comfy.input_dir / "no_captions", n=2, captions=False)
    error = run_error(comfy, train_graph({"folder": "no_captions"}, sample=False))
    assert error["node_type"] == "EasyAnimateTrainingDataset"
    assert "have no caption file" in error["exception_message"]
    (comfy.input_dir / "empty_data").mkdir(exist_ok=True)
    error = run_error(comfy, train_graph({"folder": "empty_data"}, sample=False))
    assert "holds no images" in error["exception_message"]
    write_style_images(comfy.input_dir / "rank_data", n=1)
    error = run_error(comfy, train_graph({"folder": "rank_data"}, extra={"rank": 64}, sample=False))
    assert error["node_type"] == "EasyAnimateTrainLoRA" and "rank 64 is larger" in error["exception_message"]


def test_cancel_saves_what_was_trained(comfy):
    write_style_images(comfy.input_dir / "cancel_data", n=2)
    prompt = train_graph({"folder": "cancel_data"}, steps=5000, output_name="cancelled", sample=False)

    def on_message(event):  # the training bar (max 5000), not the dataset caching before it
        progress = node_progress(event, "11")
        return progress is not None and progress[1] == 5000 and interrupt_once(comfy, event, "11", at_step=3)

    entry = comfy.watch(prompt, "train-cancel", on_message)
    assert "execution_interrupted" in [name for name, _ in entry["status"]["messages"]]
    with safe_open(str(comfy.base / "models" / "loras" / "cancelled.safetensors"), "pt") as f:
        assert 3 <= int(f.metadata()["ss_steps"]) < 5000


def test_training_nodes_are_registered_with_tooltips_and_help(comfy):
    info = comfy.object_info()
    for node_id in ("EasyAnimateTrainingDataset", "EasyAnimateTrainLoRA"):
        node = info[node_id]
        assert node["category"] == "EasyAnimate/training" and node["description"]
        inputs = {**node["input"]["required"], **node["input"].get("optional", {})}
        assert all(options.get("tooltip") for _, options in inputs.values()), node_id
    assert info["EasyAnimateTrainLoRA"]["output"] == ["EASYANIMATE_MODEL", "STRING", "IMAGE"]
