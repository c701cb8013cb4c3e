"""Run the parallel pipeline in several gloo processes on the CPU (torch.multiprocessing), for the tests."""
from __future__ import annotations

import os
import socket
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, job: dict, out_dir: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    for key, value in job.get("env", {}).items():
        os.environ[key] = value
    out = Path(out_dir)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world)
        from easyanimate_core import load_pipeline
        from easyanimate_core.parallel.comm import ALL_TO_ALL_PATH

        pipe = load_pipeline(job["model"], parallel=job["parallel"], **job.get("load", {}))
        if job.get("loras"):
            pipe.set_loras(job["loras"])
        kwargs = dict(job["generate"])
        if job.get("fail_rank") == rank:
            def callback(info):
                if info.step == job.get("fail_step", 1):
                    raise RuntimeError(f"rank {rank} fails on purpose")
            kwargs["callback"] = callback
        result = pipe.generate(**kwargs)
        torch.save({"latents": result.latents, "frames": result.frames, "all_to_all": dict(ALL_TO_ALL_PATH),
                    "has_vae": pipe.vae is not None, "has_text": pipe.text_encoders is not None},
                   out / f"rank{rank}.pt")
    except BaseException as exc:  # noqa: BLE001 - reported to the test through a file
        (out / f"rank{rank}.error").write_text(f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_parallel(world: int, job: dict, out_dir: Path, timeout_s: float = 300) -> dict:
    """Run `job` on `world` gloo ranks; {rank: saved result dict or the error text}."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    context = mp.start_processes(_rank_main, args=(world, free_port(), job, str(out_dir)), nprocs=world,
                                 join=False, start_method="spawn")
    import time

    deadline = time.monotonic() + timeout_s
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
            raise TimeoutError(f"parallel job did not finish in {timeout_s}s")
    results = {}
    for rank in range(world):
        error = out_dir / f"rank{rank}.error"
        results[rank] = error.read_text() if error.exists() else torch.load(out_dir / f"rank{rank}.pt",
                                                                             weights_only=False)
    return results
