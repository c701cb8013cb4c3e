"""The EasyAnimate Multi-GPU Loader in a real ComfyUI server, with 2 gloo worker processes on the CPU.

The workers are started once per configuration and kept; each sampling step's transformer call runs in
them. Checked: the latents equal the single-process core run (cfg=2 and ulysses=2, LoRA on), a second
run reuses the workers, Cancel mid-run reaches them and the next run still works, a worker killed
mid-run fails that run with a clear error (the queue moves on) and the next run starts fresh workers.
"""
from __future__ import annotations

import os
import signal
import time


from comfy_server import execution_error, node_progress, node_texts
from conftest import TINY_LORAS
from test_comfy_nodes import NEGATIVE, PROMPT, graph, run_ok, saved_latent
from comfy_media import TEST_HEIGHT, TEST_WIDTH

TOLERANCE = 2e-5  # float32: the split only changes matmul shapes (measured ≤ 1e-5)


def multi_gpu_graph(layout="auto", gpus=2, **kwargs):
    prompt = graph("t2v", save="latent", **kwargs)
    prompt["1"] = {"class_type": "EasyAnimateMultiGPULoader",
                   "inputs": {"model_name": "EasyAnimateV5-tiny-zh", "precision": "auto", "gpus": gpus,
                              "layout": layout, "transformer_memory": "gpu", "swap_blocks": 0, "attention": "sdpa"}}
    return prompt


def worker_pids() -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if b"easyanimate_core.parallel.worker" in f.read():
                        pids.append(int(entry))
            except OSError:
                pass
    return sorted(pids)


def core_latents(tiny_pipeline, seed, loras=()):
    pipe = tiny_pipeline("t2v")
    pipe.set_loras([(str(p), s) for p, s in loras])
    try:
        return pipe.generate(PROMPT, NEGATIVE, height=TEST_HEIGHT, width=TEST_WIDTH, num_frames=5,
                             num_inference_steps=2, seed=seed).latents
    finally:
        pipe.set_loras([])


def interrupt_when(comfy, prompt, client_id, when):
    """Queue `prompt`, call when() once the sampler reports step 2, then return the finished history entry."""
    def on_message(event):
        progress = node_progress(event, "4")
        if progress and progress[0] >= 2:
            when()
            return True
        return False

    return comfy.watch(prompt, client_id, on_message, timeout=300)


def test_multi_gpu_loader_equals_one_process_and_survives_cancel_and_a_dead_worker(comfy, tiny_pipeline):
    lora = comfy.base / "models" / "loras" / TINY_LORAS["peft"]
    before = worker_pids()
    # cfg=2 (auto with 2 workers): the two guided halves on two workers
    entry = run_ok(comfy, multi_gpu_graph(seed=5))
    assert "2 workers (ulysses=1,cfg=2; cpu, cpu; gpu)" in node_texts(entry, "1")[0]
    assert (saved_latent(comfy, entry) - core_latents(tiny_pipeline, 5)).abs().max() <= TOLERANCE
    assert len(worker_pids()) == len(before) + 2

    # ulysses=2 with a LoRA: a new layout replaces the group; the run after reuses it
    entry = run_ok(comfy, multi_gpu_graph("ulysses", seed=6, loras=[(TINY_LORAS["peft"], 0.8)]))
    expected = core_latents(tiny_pipeline, 6, [(lora, 0.8)])
    assert (saved_latent(comfy, entry) - expected).abs().max() <= TOLERANCE
    workers = worker_pids()
    assert len(workers) == len(before) + 2
    entry = run_ok(comfy, multi_gpu_graph("ulysses", seed=7))  # no LoRA: the workers drop it
    assert worker_pids() == workers  # the same processes
    assert (saved_latent(comfy, entry) - core_latents(tiny_pipeline, 7)).abs().max() <= TOLERANCE

    # Cancel mid-run: the run is interrupted, the workers stay, the next run is exact
    entry = interrupt_when(comfy, multi_gpu_graph("ulysses", seed=8, steps=200, frames=9), "mgpu-cancel",
                           lambda: comfy.post("/interrupt", {}))
    kinds = [name for name, _ in entry["status"]["messages"]]
    assert "execution_interrupted" in kinds, kinds
    assert worker_pids() == workers
    entry = run_ok(comfy, multi_gpu_graph("ulysses", seed=5))
    assert (saved_latent(comfy, entry) - core_latents(tiny_pipeline, 5)).abs().max() <= TOLERANCE

    # A worker killed mid-run: that run fails saying so, no worker is left, the queue moves on
    victim = workers[-1]
    entry = interrupt_when(comfy, multi_gpu_graph("ulysses", seed=8, steps=200, frames=9), "mgpu-kill",
                           lambda: os.kill(victim, signal.SIGKILL))
    error = execution_error(entry)
    assert error is not None and "WorkerError" in error["exception_type"], entry["status"]
    assert "exited" in error["exception_message"] and "started again on the next run" in error["exception_message"]
    deadline = time.time() + 30
    while any(pid in worker_pids() for pid in workers) and time.time() < deadline:
        time.sleep(0.2)
    assert not set(workers) & set(worker_pids())
    entry = run_ok(comfy, multi_gpu_graph("ulysses", seed=5))  # fresh workers, started by the sampler's first call
    assert len(worker_pids()) == len(before) + 2 and not set(workers) & set(worker_pids())
    assert (saved_latent(comfy, entry) - core_latents(tiny_pipeline, 5)).abs().max() <= TOLERANCE
