"""Official models fetched on first use, through huggingface_hub's real download code.

A stand-in hub (tests/hub_server.py) on 127.0.0.1 serves tiny models in the hub's URL layout under the
official repository names; HF_ENDPOINT (or endpoint=) points huggingface_hub at it. No test reaches the
internet: the "no network" cases point at a closed local port.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from comfy_server import free_port
from conftest import REPO_ROOT
from hub_server import HubServer

from easyanimate_core.download import (ModelDownloadError, download_model, ensure_model, model_target,
                                       official_name, plan_download)
from easyanimate_core.loading import validate_model_dir

INP, T2V = "EasyAnimateV5-7b-zh-InP", "EasyAnimateV5-12b-zh"
WEIGHTS = "transformer/diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def hub(tiny_model_dir, tmp_path_factory):
    """The stand-in hub with the tiny InP model as alibaba-pai/EasyAnimateV5-7b-zh-InP and the tiny T2V model
    as alibaba-pai/EasyAnimateV5-12b-zh, each with a README and a pickled duplicate that must not be fetched."""
    import shutil

    repos = {}
    for name, kind in ((INP, "inpaint"), (T2V, "t2v")):
        folder = tmp_path_factory.mktemp("hub") / name
        shutil.copytree(tiny_model_dir(kind), folder)
        (folder / "README.md").write_text("# a model card\n")
        (folder / "transformer" / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x02pickle" * 200)
        repos[f"alibaba-pai/{name}"] = folder
    server = HubServer(repos).start()
    yield server
    server.stop()


def file_gets(hub, start: int = 0) -> list[str]:
    return [path.split("/resolve/main/", 1)[1] for method, path, _ in hub.requests[start:]
            if method == "GET" and "/resolve/" in path]


def run_cli(*args, cwd, endpoint: str):
    env = {**os.environ, "HF_ENDPOINT": endpoint, "PYTHONPATH": str(REPO_ROOT), "HF_HUB_DISABLE_TELEMETRY": "1"}
    return subprocess.run([sys.executable, "-m", "easyanimate_core", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def test_official_names_in_every_form():
    assert official_name(INP) == official_name(f"alibaba-pai/{INP}") == INP
    assert official_name(f"models/EasyAnimate/{INP}/") == INP
    assert official_name("my-finetune") is None and official_name("someone/EasyAnimateV5-7b-zh-InP-x") is None
    assert model_target(INP, "models/EasyAnimate").as_posix() == f"models/EasyAnimate/{INP}"
    assert model_target(f"alibaba-pai/{INP}", "m").as_posix() == f"m/{INP}"
    assert model_target(f"elsewhere/{INP}", "m").as_posix() == f"elsewhere/{INP}"  # a path is kept


def test_plan_states_the_size_first_and_skips_pickles_and_cards(hub, tmp_path):
    plan = plan_download(INP, tmp_path / INP, endpoint=hub.url)
    source = hub.repos[f"alibaba-pai/{INP}"]
    assert WEIGHTS in plan.files and "model_index.json" in plan.files
    assert not [p for p in plan.files if p.endswith(".bin") or p == "README.md"]
    assert plan.total_bytes == sum((source / p).stat().st_size for p in plan.files)
    assert plan.describe().startswith(f"downloading alibaba-pai/{INP} (") and "to fetch" in plan.describe()


def test_cli_downloads_an_official_name_then_generates(hub, tmp_path):
    start = len(hub.requests)
    out = tmp_path / "cat.mp4"
    args = ("generate", "--model", INP, "--prompt", "a cat", "--out", out, "--height", 32, "--width", 32,
            "--frames", 5, "--steps", 2)
    result = run_cli(*args, cwd=tmp_path, endpoint=hub.url)
    assert result.returncode == 0, result.stdout + result.stderr
    import torch

    if torch.cuda.is_available():  # no --device: the GPU when there is one, and it says so
        assert "device: cuda:0 (" in result.stdout
    else:
        assert "device: cpu (no CUDA GPU found)" in result.stdout and "a CUDA GPU is much faster" in result.stdout
    folder = tmp_path / "models" / "EasyAnimate" / INP
    lines = result.stdout.splitlines()
    announced = next(i for i, line in enumerate(lines) if line.startswith(f"downloading alibaba-pai/{INP} ("))
    assert str(folder) in lines[announced] and "MB in" in lines[announced]
    assert announced < next(i for i, line in enumerate(lines) if line.startswith("loading "))
    assert "download: 100%" in result.stdout  # the progress bar (tqdm) reached the end
    assert validate_model_dir(folder).kind == "inpaint" and out.is_file()
    fetched = file_gets(hub, start)
    assert WEIGHTS in fetched and not [p for p in fetched if p.endswith(".bin") or p == "README.md"]
    # a second run finds the folder and asks the hub nothing
    again = len(hub.requests)
    result = run_cli(*args, cwd=tmp_path, endpoint=hub.url)
    assert result.returncode == 0 and "downloading" not in result.stdout, result.stdout + result.stderr
    assert len(hub.requests) == again


def test_cli_accepts_the_hub_id_and_a_path_ending_in_an_official_name(hub, tmp_path):
    result = run_cli("check", "--model", f"alibaba-pai/{T2V}", "--models-dir", tmp_path / "models", cwd=tmp_path,
                     endpoint=hub.url)
    assert result.returncode == 0, result.stderr
    assert f"{tmp_path / 'models' / T2V}: EasyAnimate V5 t2v model" in result.stdout
    path = tmp_path / "elsewhere" / T2V
    result = run_cli("check", "--model", path, cwd=tmp_path, endpoint=hub.url)
    assert result.returncode == 0 and f"{path}: EasyAnimate V5 t2v model" in result.stdout, result.stderr


def test_no_network_names_the_model_asked_for_and_the_manual_command(tmp_path):
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    result = run_cli("check", "--model", "EasyAnimateV5-7b-zh", cwd=tmp_path, endpoint=dead)
    assert result.returncode == 2
    assert "could not download the EasyAnimate model EasyAnimateV5-7b-zh from the Hugging Face Hub" in result.stderr
    assert (f"hf download alibaba-pai/EasyAnimateV5-7b-zh --local-dir "
            f"{tmp_path / 'models' / 'EasyAnimate' / 'EasyAnimateV5-7b-zh'}") in result.stderr
    assert "12b" not in result.stderr
    assert not (tmp_path / "models" / "EasyAnimate" / "EasyAnimateV5-7b-zh" / "transformer").exists()


def test_a_dropped_connection_resumes_and_an_interrupted_download_continues(hub, tmp_path, monkeypatch):
    import huggingface_hub.constants

    # 64 KiB chunks instead of 10 MiB, so the tiny weights arrive in several pieces (resume points)
    monkeypatch.setattr(huggingface_hub.constants, "DOWNLOAD_CHUNK_SIZE", 64 * 1024)
    target = tmp_path / INP
    size = (hub.repos[f"alibaba-pai/{INP}"] / WEIGHTS).stat().st_size

    # the line drops once mid-file: huggingface_hub asks for the rest (Range) and the file completes
    hub.heal()
    hub.cut_after(WEIGHTS, 128 * 1024, stay_down=False)
    start = len(hub.requests)
    download_model(INP, target, endpoint=hub.url)
    ranges = [r for m, p, r in hub.requests[start:] if m == "GET" and p.endswith(WEIGHTS)]
    assert ranges[0] is None and ranges[1] == "bytes=131072-", ranges
    assert (target / WEIGHTS).stat().st_size == size and validate_model_dir(target).kind == "inpaint"

    # a download stopped for good mid-way: the error names the model; the next run fetches only what is missing
    other = tmp_path / "again" / INP
    hub.cut_after(WEIGHTS, 64 * 1024, stay_down=True)
    reports = []
    with pytest.raises(ModelDownloadError, match=f"could not download the EasyAnimate model {INP}") as err:
        download_model(INP, other, endpoint=hub.url, progress=reports.append)
    assert f"hf download alibaba-pai/{INP} --local-dir {other}" in str(err.value)
    assert reports and reports[-1].done < reports[-1].total
    done_before = {p for p in plan_download(INP, other, endpoint=hub.url).files
                   if (other / p).is_file()}
    assert done_before and WEIGHTS not in done_before
    hub.heal()
    start = len(hub.requests)
    lines = []
    assert ensure_model(other, tmp_path / "unused", announce=lines.append, endpoint=hub.url) == other
    assert "already there" in lines[0]
    fetched = file_gets(hub, start)
    assert WEIGHTS in fetched and not set(fetched) & done_before
    assert validate_model_dir(other).kind == "inpaint"


def test_cancel_from_the_progress_callback_is_passed_on_unchanged(hub, tmp_path):
    class Cancelled(Exception):
        pass

    def cancel(info):
        raise Cancelled()

    with pytest.raises(Cancelled):
        download_model(T2V, tmp_path / T2V, endpoint=hub.url, progress=cancel)


def test_cpu_warning_for_a_12b_model(tmp_path):
    from types import SimpleNamespace

    from easyanimate_core.__main__ import cpu_warning

    weights = tmp_path / "diffusion_pytorch_model.safetensors"
    with open(weights, "wb") as f:
        f.truncate(23_600_000_000)  # a sparse file the size of the 12B transformer in bf16: no disk used
    message = cpu_warning(SimpleNamespace(transformer_weights=(weights,)))
    assert "12B model on the CPU needs about 50 GB of RAM and takes hours" in message
    assert "EasyAnimateV5-7b-zh-InP" in message and "GPU" in message
    weights.unlink()
    small = tmp_path / "small.safetensors"
    small.write_bytes(b"0" * 1000)
    assert "50 GB" not in cpu_warning(SimpleNamespace(transformer_weights=(small,)))
