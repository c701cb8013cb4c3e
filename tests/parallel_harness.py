"""Run parallel jobs in several gloo processes on the CPU (torch.multiprocessing spawn), for the tests.

A job is a dict: model, parallel, generate (kwargs of Pipeline.generate), optional load (kwargs of
load_pipeline), loras ([(path, strength)]), fail_rank/fail_step (that rank's callback raises), or
kind="comm" (both all_to_all paths on a test tensor). Each rank saves what it got per job.
"""
from __future__ import annotations

import os
import socket
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _comm_job(rank: int, world: int) -> dict:
    from easyanimate_core.parallel import comm

    send = torch.arange(world * 6, dtype=torch.float32).reshape(world, 2, 3) + 100 * rank
    got = {}
    for path in ("all_to_all_single", "all_gather"):
        comm.ALL_TO_ALL_PATH.pop("gloo", None)
        os.environ["EASYANIMATE_ALL_TO_ALL"] = "gather" if path == "all_gather" else ""
        got[path] = comm.all_to_all(send, dist.group.WORLD)
        got[path + "_used"] = comm.ALL_TO_ALL_PATH["gloo"]
    os.environ["EASYANIMATE_ALL_TO_ALL"] = ""
    comm.ALL_TO_ALL_PATH.pop("gloo", None)
    return got


def _generate_job(rank: int, job: dict) -> dict:
    from easyanimate_core import load_pipeline
    from easyanimate_core.parallel.comm import ALL_TO_ALL_PATH

    pipe = load_pipeline(job["model"], parallel=job["parallel"], **job.get("load", {}))
    if job.get("loras"):
        pipe.set_loras(job["loras"])
    kwargs = dict(job["generate"])
    steps = []

    def callback(info):
        steps.append(info.step)
        if job.get("fail_rank") == rank and info.step == job.get("fail_step", 1):
            raise RuntimeError(f"rank {rank} fails on purpose")

    result = pipe.generate(**kwargs, callback=callback)
    return {"latents": result.latents, "frames": result.frames, "all_to_all": dict(ALL_TO_ALL_PATH), "steps": steps,
            "plan": pipe.memory_plan.describe(), "has_vae": pipe.vae is not None, "has_text": pipe.text_encoders is not None,
            "blocks_runner_after": pipe.transformer.blocks_runner,
            "attention_fns_after": {b.attention_fn.__name__ for b in pipe.transformer.transformer_blocks}}


def _rank_main(rank: int, world: int, port: int, jobs: list, out_dir: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    out = Path(out_dir)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world)
        for index, job in enumerate(jobs):
            try:
                result = _comm_job(rank, world) if job.get("kind") == "comm" else _generate_job(rank, job)
            except Exception as exc:  # noqa: BLE001 - reported to the test through the result
                result = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
            torch.save(result, out / f"job{index}_rank{rank}.pt")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_parallel(world: int, jobs: list[dict], out_dir: Path, timeout_s: float = 600) -> list[dict]:
    """Run `jobs` one after the other on `world` gloo ranks; per job, {rank: saved result dict}."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    context = mp.start_processes(_rank_main, args=(world, free_port(), jobs, str(out_dir)), nprocs=world,
                                 join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    try:
        while not context.join(timeout=1):
            if time.monotonic() > deadline:
                raise TimeoutError(f"parallel jobs did not finish in {timeout_s}s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
    return [{rank: torch.load(out_dir / f"job{i}_rank{rank}.pt", weights_only=False) for rank in range(world)}
            for i in range(len(jobs))]
