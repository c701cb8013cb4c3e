"""A group of worker processes that run one transformer under a parallel layout, for a host process
(the ComfyUI server) that keeps the text encoders, the VAE and the sampling loop itself.

    group = WorkerGroup(model_dir, "cfg=2", devices=["cuda:0", "cuda:1"], dtype=torch.bfloat16)
    group.start()                                  # once; loads the transformer in every worker
    transformer = RemoteTransformer(group)         # drop-in for the transformer of a Pipeline
    pipe.denoise(...)                              # each step's call runs on the workers
    group.close()

The workers are plain `python -m easyanimate_core.parallel.worker` processes (worker.py): they import
only this package, never the host's main module. They form their own torch.distributed world (NCCL on
GPUs, gloo on the CPU) and talk to the host over local authenticated sockets
(multiprocessing.connection). While the host waits for a step, it polls: `poll()` (the host's Cancel
check) and the workers' liveness. Cancel reaches the workers, which stop together at the next block
boundary; a dead worker or a worker error stops the whole group (no process is left waiting in a
collective) and raises WorkerError; the next call starts a fresh group.
"""
from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Listener, wait
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from ..models.transformer import TransformerConfig
from .spec import ParallelError, parse_parallel
from .worker import recv_message, send_message

PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # the folder holding easyanimate_core/
POLL_S = 0.05


class WorkerError(ParallelError):
    """A worker failed or died; the group was stopped."""


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class WorkerGroup:
    """N worker processes holding the transformer of `model_dir` under `parallel` (see module doc)."""

    def __init__(self, model_dir, parallel, *, devices: list[str], dtype: torch.dtype = torch.float32,
                 backend: Optional[str] = None, fp8: bool = False, swap_blocks: int = 0, attention: str = "sdpa",
                 startup_timeout_s: float = 300, threads: Optional[int] = None):
        from ..loading import validate_model_dir
        from .groups import default_backend

        self.files = validate_model_dir(model_dir)
        self.config = TransformerConfig.from_dict(self.files.transformer_config)
        self.spec = parse_parallel(parallel)
        self.spec.check_heads(self.config.num_attention_heads)
        self.spec.check_world(len(devices))
        self.devices = [str(torch.device(d)) for d in devices]
        self.backend = backend or default_backend(self.devices[0])
        from .groups import check_backend

        for device in self.devices:
            check_backend(self.backend, torch.device(device))
        if self.backend == "nccl":
            count = torch.cuda.device_count()
            missing = [d for d in self.devices if torch.device(d).index is not None and torch.device(d).index >= count]
            if missing:
                raise ParallelError(f"{len(self.devices)} GPUs were asked for but this machine has {count}: "
                                    f"{', '.join(missing)} do not exist")
        self.dtype, self.fp8, self.swap_blocks, self.attention = dtype, fp8, int(swap_blocks or 0), attention
        self.startup_timeout_s, self.threads = startup_timeout_s, threads
        self.processes: list[subprocess.Popen] = []
        self.conns = []
        self._lock = threading.Lock()
        self.calls = 0      # transformer calls served (for tests and logs)
        self.starts = 0     # how many times workers were started
        self.cancels = 0    # calls the workers stopped mid-way on a cancel

    # ------------------------------------------------------------------ life cycle
    @property
    def running(self) -> bool:
        return bool(self.processes) and all(p.poll() is None for p in self.processes)

    def start(self) -> "WorkerGroup":
        """Start the workers and wait until every one has loaded the transformer (no-op when running)."""
        if self.running:
            return self
        self.close()
        key = secrets.token_bytes(16)
        listener = Listener(("127.0.0.1", 0), authkey=key)
        world, port = len(self.devices), _free_port()
        env = {**os.environ, "EASYANIMATE_WORKER_KEY": key.hex(),
               "PYTHONPATH": os.pathsep.join([str(PACKAGE_ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
        base = {"model_dir": str(self.files.root), "parallel": str(self.spec), "devices": self.devices,
                "world_size": world, "port": port, "backend": self.backend, "controller": list(listener.address),
                "dtype": str(self.dtype).replace("torch.", ""), "fp8": self.fp8, "swap_blocks": self.swap_blocks,
                "attention": self.attention, "threads": self.threads}
        try:
            for rank in range(world):
                env["EASYANIMATE_WORKER_CONFIG"] = json.dumps({**base, "rank": rank})
                self.processes.append(subprocess.Popen([sys.executable, "-m", "easyanimate_core.parallel.worker"],
                                                       env=dict(env), cwd=str(PACKAGE_ROOT)))
            self.conns = self._accept(listener, world)
            self._receive(expect=("ready",), from_all=True, deadline=time.monotonic() + self.startup_timeout_s)
            self.starts += 1
            return self
        except BaseException:
            self.close()
            raise
        finally:
            listener.close()

    def _accept(self, listener, world: int) -> list:
        accepted: list = []
        thread = threading.Thread(target=lambda: [accepted.append(listener.accept()) for _ in range(world)],
                                  daemon=True)
        thread.start()
        deadline = time.monotonic() + self.startup_timeout_s
        while thread.is_alive():
            thread.join(POLL_S)
            self._check_alive("while starting")
            if time.monotonic() > deadline:
                raise WorkerError(f"the {world} workers did not connect within {self.startup_timeout_s:.0f}s")
        return accepted  # in any order: every answer names its rank

    def close(self, timeout_s: float = 10) -> None:
        """Stop the workers (asking first, then killing what is left)."""
        for conn in self.conns:
            try:
                send_message(conn, ("stop",))
            except OSError:
                pass
        deadline = time.monotonic() + timeout_s
        for process in self.processes:
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for conn in self.conns:
            conn.close()
        self.processes, self.conns = [], []

    def kill(self) -> None:
        """Stop at once: after a failure the other workers may be waiting in a collective."""
        for process in self.processes:
            if process.poll() is None:
                process.kill()
        for process in self.processes:
            process.wait()
        for conn in self.conns:
            conn.close()
        self.processes, self.conns = [], []

    def _settle(self, timeout_s: float = 2.0) -> None:
        """Give a worker that is going down (its socket already closed) the moment it takes to exit."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and all(p.poll() is None for p in self.processes):
            time.sleep(0.02)

    def _check_alive(self, when: str) -> None:
        for rank, process in enumerate(self.processes):
            code = process.poll()
            if code is not None:
                self.kill()
                raise WorkerError(f"EasyAnimate worker {rank} exited (code {code}) {when}; all workers were stopped "
                                  "and will be started again on the next run. Its error, if any, is in the log "
                                  "above.")

    # ------------------------------------------------------------------ messages
    def _receive(self, expect: tuple[str, ...], from_all: bool, poll: Optional[Callable[[], None]] = None,
                 deadline: Optional[float] = None):
        """The next message of a kind in `expect` (from rank 0, or one per worker when `from_all`), checking
        `poll` (which raises to cancel) and the workers' liveness meanwhile."""
        replies, interrupt = {}, None
        wanted = len(self.conns) if from_all else 1
        first = True
        while len(replies) < wanted:
            ready = [] if first and poll is not None else wait(self.conns, timeout=POLL_S)
            first = False  # the first round polls before waiting: a Cancel pressed already stops at once
            for conn in ready:
                try:
                    message = recv_message(conn)
                except (EOFError, OSError):
                    self._settle()
                    self._check_alive("during a run")
                    self.kill()
                    raise WorkerError("an EasyAnimate worker closed its connection; all workers were stopped and "
                                      "will be started again on the next run") from None
                kind = message[0]
                if kind == "error":
                    _, rank, text, exc, trace = message
                    if expect == ("loras",) and exc is not None:  # same on every rank, before any collective
                        replies[rank] = _host_error(*exc)
                        continue
                    self._settle()  # a peer's death shows up as this worker's connection error: name the dead one
                    self._check_alive("during a run")
                    self.kill()
                    raise WorkerError(f"EasyAnimate worker {rank} failed: {text}; all workers were stopped and "
                                      f"will be started again on the next run.\n{trace}")
                if kind == "cancelled":
                    self.cancels += 1
                    raise interrupt if interrupt is not None else WorkerError("the workers stopped a call")
                if kind in expect:
                    replies[message[1] if from_all else 0] = message
            if not ready:
                self._check_alive("during a run")
                if deadline is not None and time.monotonic() > deadline:
                    self.kill()
                    raise WorkerError(f"the EasyAnimate workers were not ready within {self.startup_timeout_s:.0f}s "
                                      f"({len(replies)} of {wanted} answered); all were stopped. The log shows how "
                                      "far each got.")
                if poll is not None and interrupt is None:
                    try:
                        poll()
                    except BaseException as exc:  # the host's Cancel: tell the workers, wait for them
                        interrupt = exc
                        self._send(("cancel",))
        if interrupt is not None:  # the result came before the workers saw the cancel
            raise interrupt
        return replies if from_all else replies[0]

    def _send(self, message) -> None:
        for conn in self.conns:
            try:
                send_message(conn, message)
            except OSError:
                self._check_alive("while sending a request")
                raise

    def call(self, model_in, timestep, bert, t5, inpaint=None, control=None,
             poll: Optional[Callable[[], None]] = None) -> torch.Tensor:
        """One transformer call on the workers (inputs and result on the CPU, float32 prediction)."""
        with self._lock:
            self.start()
            tensors = tuple(None if t is None else t.detach().cpu() for t in (model_in, timestep, bert, t5, inpaint,
                                                                               control))
            self._send(("call",) + tensors)
            message = self._receive(("result",), from_all=False, poll=poll)
            self.calls += 1
            return message[1]

    def set_loras(self, loras):
        """Every worker computes with exactly these LoRAs; returns rank 0's LoraReport (errors re-raised)."""
        with self._lock:
            self.start()
            self._send(("loras", [(str(p), float(s)) for p, s in loras]))
            replies = self._receive(("loras",), from_all=True)
            for reply in replies.values():
                if isinstance(reply, BaseException):
                    raise reply
            from ..lora import LoraFileReport, LoraReport

            report = replies[0][2]
            return LoraReport(files=[LoraFileReport(**f) for f in report["files"]], targets=report["targets"])


def _host_error(name: str, message: str) -> BaseException:
    """The worker's user-facing error (errors.py) as this process's class of that name."""
    from .. import errors

    cls = getattr(errors, name, None)
    return cls(message) if isinstance(cls, type) and issubclass(cls, errors.EasyAnimateError) else WorkerError(message)


class RemoteTransformer(nn.Module):
    """Stands in for the transformer inside the host's Pipeline: same call, run by a WorkerGroup.

    It holds no weights. `poll` is called while a step runs (a host's Cancel check that raises).
    """

    def __init__(self, group: WorkerGroup, poll: Optional[Callable[[], None]] = None):
        super().__init__()
        self.group, self.config, self.poll = group, group.config, poll
        self._dtype = group.dtype
        self.blocks_runner = None
        self.transformer_blocks = nn.ModuleList()
        self.register_buffer("_device_anchor", torch.zeros(()), persistent=False)  # follows .to(device)

    @property
    def compute_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self._dtype.itemsize == 1 else self._dtype

    def set_loras_remote(self, loras):
        return self.group.set_loras(loras)

    def forward(self, hidden_states, timestep, encoder_hidden_states, encoder_hidden_states_t5=None,
                inpaint_latents=None, control_latents=None, image_rotary_emb=None):
        if image_rotary_emb is not None:
            raise ParallelError("RemoteTransformer builds its RoPE tables in the workers; do not pass them")
        timestep = torch.as_tensor(timestep).reshape(-1).expand(hidden_states.shape[0])
        pred = self.group.call(hidden_states, timestep, encoder_hidden_states, encoder_hidden_states_t5,
                               inpaint_latents, control_latents, poll=self.poll)
        return pred.to(hidden_states.device, hidden_states.dtype)
