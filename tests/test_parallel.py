"""Multi-process sampling (easyanimate_core.parallel) on the CPU with the gloo backend.

Every parallel run is compared with the single-process run of the same call: same seed → same latents
and frames within float32 tolerance (the split changes only the shapes of some matmuls: batch 1 instead
of 2 under cfg=2, S instead of Lv rows under Ulysses). Golden models (2 heads) for ulysses=2 and
cfg=2; a 4-head variant of the golden T2V folder for ulysses=4. Runs are cheap (2 steps, tiny sizes)
and grouped: one spawn of 2 processes and one of 4 for all equality cases.
"""
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from conftest import REPO_ROOT, golden_path
from easyanimate_core import load_pipeline
from easyanimate_core.parallel import ParallelError, parse_parallel
from easyanimate_core.parallel.groups import check_backend
from easyanimate_core.parallel.ulysses import shard_bounds
from parallel_harness import free_port, run_parallel
from tiny_lora import write_tiny_lora

# max |parallel - single| on final latents and frames (float32): DDIM 2e-5 (measured ≤ 7.4e-6); Euler works at
# sigmas up to ~4096 and amplifies the same float noise, as in the golden tolerances (measured 1.2e-4)
TOLERANCE = {"DDIM": 2e-5, "Euler": 1e-3}
T2V, INP, CONTROL = "EasyAnimateV5-tiny-zh", "EasyAnimateV5-tiny-zh-InP", "EasyAnimateV5-tiny-zh-Control"
IMAGE = torch.linspace(0, 1, 64 * 112 * 3).reshape(64, 112, 3)
VIDEO = torch.rand(5, 64, 112, 3, generator=torch.Generator().manual_seed(5))
BASE = dict(prompt="a cat playing guitar", negative_prompt="ugly", num_inference_steps=2, seed=11,
            guidance_scale=6.0)


def four_head_model(root):
    """The golden T2V folder with a 4-head transformer (heads 4 x 16: inner dim 64), for ulysses=4."""
    from tiny_model import _save_module, _scale_weights, transformer_config
    from easyanimate_core.models.transformer import EasyAnimateTransformer3D

    source = golden_path("models", T2V)
    shutil.copytree(source, root, ignore=shutil.ignore_patterns("transformer"))
    config = transformer_config("t2v")
    config.update(num_attention_heads=4, time_embed_dim=32)
    model = EasyAnimateTransformer3D.from_config_dict(config)
    _scale_weights(model, 21)
    _save_module(model, root / "transformer", config)
    return root


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    """(world, jobs) of the equality runs, and the single-process result of each job."""
    tmp = tmp_path_factory.mktemp("parallel")
    models = {name: golden_path("models", name) for name in (T2V, INP, CONTROL)}
    models["4heads"] = four_head_model(tmp / "EasyAnimateV5-tiny-4heads")
    loras = {}
    for name, layout in ((T2V, "peft"), (INP, "kohya"), (CONTROL, "kohya"), ("4heads", "peft")):
        single = load_pipeline(models[name])
        loras[name] = [(str(write_tiny_lora(tmp / f"{layout}-{name}.safetensors", single.transformer, rank=2,
                                            seed=3, alpha=None if layout == "peft" else 2.0, layout=layout)), 0.8)]
    job = {
        # 48x80, 1 frame: 15 video tokens, uneven over 2 ranks (8 + 7: the second shard is padded)
        "t2v_u2_uneven": (2, T2V, "ulysses=2", dict(height=48, width=80, num_frames=1)),
        "inp_u2_i2v": (2, INP, "ulysses=2", dict(height=64, width=112, num_frames=5, start_image=IMAGE)),
        "control_u2": (2, CONTROL, "ulysses=2", dict(height=64, width=112, num_frames=5, control_video=VIDEO)),
        "t2v_cfg2": (2, T2V, "cfg=2", dict(height=64, width=112, num_frames=5, sampler="Euler")),
        # a memory mode on every rank: block swap moves weights, not numbers
        "t2v_u2_block_swap": (2, T2V, "ulysses=2", dict(height=64, width=112, num_frames=5)),
        # 48x80, 5 frames: 30 tokens over 4 ranks (8, 8, 8, 6)
        "t2v_u4_uneven": (4, "4heads", "ulysses=4", dict(height=48, width=80, num_frames=5)),
        "inp_u2_cfg2_v2v": (4, INP, "ulysses=2,cfg=2", dict(height=64, width=112, num_frames=5, video=VIDEO,
                                                            strength=0.7)),
        "control_u2_cfg2": (4, CONTROL, "cfg=2,ulysses=2", dict(height=64, width=112, num_frames=5,
                                                                control_video=VIDEO)),
    }
    jobs, expected = {2: [], 4: []}, {}
    for name, (world, model, spec, extra) in job.items():
        generate = {**BASE, **extra}
        single = load_pipeline(models[model])
        single.set_loras(loras[model])
        expected[name] = single.generate(**generate)
        jobs[world].append({"name": name, "model": str(models[model]), "parallel": spec, "generate": generate,
                            "loras": loras[model],
                            "load": {"memory": "block_swap", "swap_blocks": 1} if "block_swap" in name else {}})
    jobs[2].insert(0, {"kind": "comm", "name": "comm"})
    jobs[2].append({"name": "rank1_fails", "model": str(models[T2V]), "parallel": "ulysses=2", "fail_rank": 1,
                    "generate": {**BASE, "height": 48, "width": 80, "num_frames": 1, "num_inference_steps": 3}})
    results = {}
    for world in (2, 4):
        for job_, by_rank in zip(jobs[world], run_parallel(world, jobs[world], tmp / f"world{world}")):
            results[job_["name"]] = by_rank
    return results, expected


@pytest.mark.parametrize("name", ["t2v_u2_uneven", "inp_u2_i2v", "control_u2", "t2v_cfg2", "t2v_u2_block_swap",
                                  "t2v_u4_uneven",
                                  "inp_u2_cfg2_v2v", "control_u2_cfg2"])
def test_parallel_equals_single_process(cases, name):
    results, expected = cases
    by_rank = results[name]
    for rank, got in by_rank.items():
        assert "error" not in got, got.get("traceback")
    driver, ref = by_rank[0], expected[name]
    latents_error = (driver["latents"] - ref.latents).abs().max().item()
    frames_error = (driver["frames"] - ref.frames).abs().max().item()
    print(f"{name}: max |parallel - single| latents {latents_error:.2e}, frames {frames_error:.2e}")
    tolerance = TOLERANCE[ref_sampler(name)]
    assert latents_error <= tolerance and frames_error <= tolerance
    assert driver["has_vae"] and driver["has_text"]
    assert driver["steps"] == list(range(1, len(driver["steps"]) + 1)) and driver["steps"]
    for rank, got in by_rank.items():
        # every rank ends with the same latents; only rank 0 holds the VAE/text encoders and decodes
        assert torch.equal(got["latents"], driver["latents"])
        assert got["blocks_runner_after"] is None and got["attention_fns_after"] == {"sdpa_attention"}
        if "block_swap" in name:
            assert "1 of 2 blocks swapped" in got["plan"], got["plan"]
        if rank:
            assert got["frames"] is None and not got["has_vae"] and not got["has_text"]
    if "u" in name.split("_")[1]:
        assert driver["all_to_all"] == {"gloo": "all_to_all_single"}


def ref_sampler(name):
    return "Euler" if name == "t2v_cfg2" else "DDIM"


def test_all_to_all_paths_agree(cases):
    results, _ = cases
    for rank, got in results["comm"].items():
        assert got["all_to_all_single_used"] == "all_to_all_single" and got["all_gather_used"] == "all_gather"
        assert torch.equal(got["all_to_all_single"], got["all_gather"])
        # chunk i came from rank i: rank i's value 100 * i + its chunk for this rank
        expected = torch.stack([torch.arange(6.).reshape(2, 3) + 6 * rank + 100 * src for src in range(2)])
        assert torch.equal(got["all_gather"], expected)


def test_a_failing_rank_stops_every_rank_after_that_step(cases):
    results, _ = cases
    failing, other = results["rank1_fails"][1], results["rank1_fails"][0]
    assert failing["error"] == "RuntimeError: rank 1 fails on purpose"
    assert other["error"] == "ParallelError: rank 1 stopped after step 1/3; this rank stops too"


def test_shard_bounds_cover_every_token_once():
    for length in (1, 5, 15, 30, 4096):
        for size in (1, 2, 3, 4, 8):
            covered = []
            for rank in range(size):
                start, stop, shard = shard_bounds(length, size, rank)
                assert 0 <= stop - start <= shard
                covered.extend(range(start, stop))
            assert covered == list(range(length))


@pytest.mark.parametrize("spec, message", [
    ("ulysses=two", "is not a whole number"), ("ring=2", "unknown parallel degree 'ring'"),
    ("cfg=3", "cfg is 1 or 2"), ("ulysses", "is not name=degree"), ("ulysses=0", "at least 1"),
    ("ulysses=2,ulysses=2", "given twice"), ("", "empty parallel spec")])
def test_bad_specs(spec, message):
    with pytest.raises(ParallelError, match=message):
        parse_parallel(spec)


def test_spec_parsing():
    assert parse_parallel("ulysses=2,cfg=2").world_size == 4
    assert parse_parallel(" CFG = 2 ") == parse_parallel({"cfg": 2})


@pytest.mark.parametrize("spec, message", [
    ("ulysses=4", r"ulysses=4 asks for more ranks than the model has attention heads \(2\)"),
    ("ulysses=3", r"ulysses=3 asks for more ranks"),
])
def test_degrees_must_fit_the_heads(spec, message):
    with pytest.raises(ParallelError, match=message):
        load_pipeline(golden_path("models", T2V), parallel=spec)
    with pytest.raises(ParallelError, match="does not divide the model's 48 attention heads; use one of 1, 2, 3, 4, "
                                            "6, 8, 12, 16, 24, 48"):
        parse_parallel("ulysses=5").check_heads(48)


def test_world_size_must_match_and_a_group_must_exist():
    with pytest.raises(ParallelError, match="needs an initialised torch.distributed process group"):
        load_pipeline(golden_path("models", T2V), parallel="ulysses=2")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        with pytest.raises(ParallelError, match=r"ulysses=2,cfg=2 needs ulysses × cfg = 4 processes, but the process "
                                                r"group has 1: start as many \(torchrun --nproc-per-node 4\)"):
            load_pipeline(golden_path("models", T2V), parallel="ulysses=2,cfg=2")
    finally:
        dist.destroy_process_group()


def test_nccl_on_a_cpu_machine_is_refused():
    with pytest.raises(ParallelError, match="NCCL"):
        check_backend("nccl", torch.device("cpu"))


def _cli(*args, env=None, launcher=()):
    return subprocess.run([sys.executable, *launcher, "-m", "easyanimate_core", *map(str, args)], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1",
                                                                            **(env or {})})


def test_cli_under_torchrun_writes_what_one_process_writes(tmp_path):
    import numpy as np
    from PIL import Image

    args = ["generate", "--model", golden_path("models", INP), "--prompt", "a cat", "--height", 64, "--width", 112,
            "--frames", 1, "--steps", 2, "--device", "cpu", "--start-image", tmp_path / "start.png"]
    Image.fromarray((IMAGE.numpy() * 255).astype("uint8")).save(tmp_path / "start.png")
    single = _cli(*args, "--out", tmp_path / "single.png")
    assert single.returncode == 0, single.stderr
    parallel = _cli(*args, "--out", tmp_path / "parallel.png", "--parallel", "ulysses=2",
                    launcher=("-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port())))
    assert parallel.returncode == 0, parallel.stderr
    assert parallel.stdout.count("wrote") == 1 and parallel.stdout.count("step 2/2") == 1  # rank 0 alone reports
    a = np.asarray(Image.open(tmp_path / "single.png")).astype(int)
    b = np.asarray(Image.open(tmp_path / "parallel.png")).astype(int)
    assert np.abs(a - b).max() <= 1


def test_cli_parallel_errors(tmp_path):
    args = ["generate", "--model", golden_path("models", T2V), "--prompt", "a cat", "--out", tmp_path / "x.png",
            "--device", "cpu", "--parallel", "ulysses=2"]
    no_launcher = _cli(*args)
    assert no_launcher.returncode == 2 and "torchrun --nproc-per-node N" in no_launcher.stderr
    env = {"RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    nccl = _cli(*args, "--backend", "nccl", env=env)
    assert nccl.returncode == 2 and "NCCL" in nccl.stderr and "gloo" in nccl.stderr
    world = _cli(*args, env=env)
    assert world.returncode == 2 and "needs ulysses × cfg = 2 processes, but the process group has 1" in world.stderr


def test_parallel_comm_benchmark_prints_every_layout():
    done = subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / "parallel_comm.py")], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    rows = [line for line in done.stdout.splitlines() if "ulysses=" in line]
    assert len(rows) == 12 and all(line.count("x") >= 3 for line in rows)
    # cfg=2 alone sends only the prediction: close to a 2x speed-up on either link
    assert " 2.00x" in next(line for line in rows if "ulysses=1,cfg=2" in line)
