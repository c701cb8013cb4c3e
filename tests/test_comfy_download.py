"""The Model Loader in a real ComfyUI server (0.3.75 and 0.33.0) downloads an official model on first use.

The server's HF_ENDPOINT points at the stand-in hub (tests/hub_server.py), which serves the tiny InP model as
alibaba-pai/EasyAnimateV5-7b-zh-InP; huggingface_hub's own download code runs inside the server.
"""
from __future__ import annotations

import json

import pytest

from comfy_media import TEST_HEIGHT, TEST_WIDTH
from comfy_server import ComfyServer, comfyui_033_missing, execution_error, node_progress
from conftest import COMFYUI_VERSIONS, REPO_ROOT, TINY_MODEL_NAMES
from hub_server import HubServer

from easyanimate_core.loading import OFFICIAL_MODELS

OFFICIAL = "EasyAnimateV5-7b-zh-InP"
WEIGHTS = "transformer/diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module", params=COMFYUI_VERSIONS, ids=[f"comfyui-{v}" for v in COMFYUI_VERSIONS])
def served(request, tmp_path_factory, tiny_model_dir):
    """(ComfyUI server with HF_ENDPOINT at the stand-in hub, the hub); only the tiny T2V model is installed."""
    if request.param == "0.33" and comfyui_033_missing():
        pytest.skip(comfyui_033_missing())
    hub = HubServer({f"alibaba-pai/{OFFICIAL}": tiny_model_dir("inpaint")}).start()
    server = ComfyServer(tmp_path_factory.mktemp(f"comfyui-hub-{request.param}"), REPO_ROOT, version=request.param,
                         env={"HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0"}).prepare()
    (server.models_dir / TINY_MODEL_NAMES["t2v"]).symlink_to(tiny_model_dir("t2v"), target_is_directory=True)
    server.start()
    yield server, hub
    server.stop()
    hub.stop()


def graph(model_name: str) -> dict:
    return {
        "1": {"class_type": "EasyAnimateModelLoader",
              "inputs": {"model_name": model_name, "precision": "auto", "memory_mode": "auto", "swap_blocks": 0,
                         "attention": "sdpa", "compile": False}},
        "2": {"class_type": "EasyAnimateTextEncode",
              "inputs": {"text_encoders": ["1", 1], "prompt": "a fox", "negative_prompt": "blurry"}},
        "3": {"class_type": "EasyAnimateEmptyLatent", "inputs": {"width": TEST_WIDTH, "height": TEST_HEIGHT,
                                                                 "length": 5}},
        "4": {"class_type": "EasyAnimateSampler",
              "inputs": {"model": ["1", 0], "positive": ["2", 0], "negative": ["2", 1], "latent_image": ["3", 0],
                         "seed": 1, "steps": 2, "cfg": 6.0, "sampler_name": "DDIM", "denoise": 1.0}},
        "9": {"class_type": "SaveLatent", "inputs": {"samples": ["4", 0], "filename_prefix": "latents/download"}},
    }


def test_cancel_stops_a_download_and_the_next_run_resumes_it(served):
    """Cancel while a file is arriving: the download stops at the next progress report (per 10 MB chunk; the
    whole file here), dropping that file; the next run (the test below) fetches only what is missing."""
    import time

    server, hub = served
    slow = "text_encoder/model.safetensors"  # early in the download: the transformer and VAE come later
    hub.slow[slow] = 4.0
    try:
        code, answer = server.post("/prompt", {"prompt": graph(OFFICIAL), "client_id": "download-cancel"})
        assert code == 200, answer
        deadline = time.time() + 120
        while not any(m == "GET" and p.endswith(slow) for m, p, _ in hub.requests):
            assert time.time() < deadline, "the download never reached " + slow
            time.sleep(0.05)
        server.post("/interrupt", {})
        entry = server.wait(answer["prompt_id"])
    finally:
        hub.slow.clear()
    kinds = [name for name, _ in entry["status"]["messages"]]
    assert "execution_interrupted" in kinds, kinds
    folder = server.models_dir / OFFICIAL
    # stopped in that file (which starts again next time); the files finished before it are kept
    assert (folder / "model_index.json").is_file() and (folder / "text_encoder" / "config.json").is_file()
    assert not (folder / slow).exists() and not (folder / WEIGHTS).exists()
    assert OFFICIAL in server.get("/easyanimate/models")["not_downloaded"]


def test_the_loader_lists_official_models_not_downloaded_and_fetches_one_on_first_use(served):
    server, hub = served
    options = server.get("/object_info/EasyAnimateModelLoader")["EasyAnimateModelLoader"]["input"]["required"][
        "model_name"]
    choices = options[0] if isinstance(options[0], list) else options[1]["options"]
    assert choices[0] == TINY_MODEL_NAMES["t2v"] and set(OFFICIAL_MODELS) <= set(choices)
    status = server.get("/easyanimate/models")
    assert set(status["not_downloaded"]) == set(OFFICIAL_MODELS)  # what the page marks "(not downloaded)"

    folder = server.models_dir / OFFICIAL  # after a Cancel (the test above): the files finished before it
    present = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and ".cache" not in p.parts}
    asked_before = len(hub.requests)
    progress = []

    def on_message(event):
        if node_progress(event, "1"):
            progress.append(node_progress(event, "1"))

    entry = server.watch(graph(OFFICIAL), "download-test", on_message, timeout=300)
    assert execution_error(entry) is None, json.dumps(execution_error(entry), indent=1)[:3000]
    total = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and ".cache" not in p.parts)
    # ComfyUI's progress bar on the loader, in bytes, up to the whole download
    assert progress and progress[-1] == (total, total) and all(m == total for _, m in progress), progress[-3:]
    assert [v for v, _ in progress] == sorted(v for v, _ in progress)
    assert f"downloading alibaba-pai/{OFFICIAL} (" in server.log()  # the size, stated first, in the console
    assert OFFICIAL not in server.get("/easyanimate/models")["not_downloaded"]
    fetched = {p.split("/resolve/main/", 1)[1] for m, p, _ in hub.requests[asked_before:] if m == "GET"
               and "/resolve/" in p}
    assert WEIGHTS in fetched and not fetched & present, f"files already there were fetched again: {fetched & present}"
    # the second run loads the folder without asking the hub
    asked = len(hub.requests)
    entry = server.run(graph(OFFICIAL))
    assert execution_error(entry) is None and len(hub.requests) == asked


def test_an_unreachable_hub_names_the_model_and_the_manual_command(served):
    server, hub = served
    name = "EasyAnimateV5-12b-zh-Control"  # the stand-in hub does not have it: 404
    entry = server.run(graph(name))
    error = execution_error(entry)
    assert error is not None and error["node_type"] == "EasyAnimateModelLoader"
    message = error["exception_message"]
    assert f"'{name}' was not found" in message and f"could not download the EasyAnimate model {name}" in message
    assert f"hf download alibaba-pai/{name} --local-dir {server.models_dir / name}" in message
    assert "alibaba-pai/EasyAnimateV5-12b-zh-InP" not in message  # the model asked for, not a default
