"""One worker process of a WorkerGroup (workers.py): `python -m easyanimate_core.parallel.worker`.

It joins the group's torch.distributed world, loads only the transformer (in the memory mode asked
for), tells the controller it is ready, then serves requests until "stop" or until the controller
goes away:
- ("call", model_in, timestep, bert, t5, inpaint, control): one transformer call under the parallel
  layout; rank 0 sends back ("result", prediction on the CPU).
- ("loras", [(path, strength)]): every rank sets them and answers ("loras", report) or ("error", …).
- ("cancel",): the call in progress stops at the next block boundary on every rank together (the ranks
  agree through an all_reduce before each block, so none is left waiting in a collective) and rank 0
  answers ("cancelled",).
Any other failure is answered ("error", rank, message); the controller then stops the whole group.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pickle
import queue
import sys
import threading
import traceback
from datetime import timedelta
from multiprocessing.connection import Client

import torch
import torch.distributed as dist


def send_message(conn, message) -> None:
    """Plain pickle (tensors by value): the connection's own pickler would pass torch tensors as shared
    file descriptors, which needs a multiprocessing parent that these processes do not have."""
    conn.send_bytes(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))


def recv_message(conn):
    return pickle.loads(conn.recv_bytes())


class Cancelled(Exception):
    """The controller asked to stop the call in progress."""


def _say(rank: int, text: str) -> None:
    print(f"EasyAnimate worker {rank}: {text}", file=sys.stderr, flush=True)


def _config() -> dict:
    return json.loads(os.environ["EASYANIMATE_WORKER_CONFIG"])


def _reader(conn, inbox: "queue.Queue", cancel: threading.Event) -> None:
    """Move the controller's messages to `inbox`; a cancel sets `cancel` at once (the main thread is busy)."""
    try:
        while True:
            message = recv_message(conn)
            if message[0] == "cancel":
                cancel.set()
            else:
                inbox.put(message)
    except (EOFError, OSError):
        inbox.put(("stop",))  # the controller is gone: stop serving


def _agreed_cancel_hook(cancel: threading.Event, device: torch.device):
    """A forward pre-hook for every block: all ranks stop together when any rank saw the cancel."""
    def hook(module, args):
        flag = torch.tensor([1 if cancel.is_set() else 0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if int(flag.item()):
            raise Cancelled()
    return hook


def _load(config: dict, device: torch.device):
    from .. import load_transformer
    from ..attention import set_attention_backend
    from ..block_swap import enable_block_swap
    from ..loading import validate_model_dir

    files = validate_model_dir(config["model_dir"])
    dtype = getattr(torch, config["dtype"])
    transformer = load_transformer(files, dtype=dtype, device=device, fp8=config.get("fp8", False))
    if config.get("attention", "sdpa") != "sdpa":
        set_attention_backend(transformer, config["attention"], device=device)
    if config.get("swap_blocks"):
        enable_block_swap(transformer, int(config["swap_blocks"]), device)
    return transformer.eval()


def serve(conn, config: dict) -> None:
    from ..pipeline import call_transformer  # noqa: F401 - imported here so a broken install fails at start
    from ..text import PromptEmbeds
    from .groups import make_groups
    from .split import split_transformer

    rank, world = int(config["rank"]), int(config["world_size"])
    device = torch.device(config["devices"][rank])
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(int(config.get("threads") or max(1, (os.cpu_count() or 1) // world)))
    backend = config["backend"]
    _say(rank, f"connected; joining a {world}-process {backend} group")
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{config['port']}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=float(config.get("timeout_s", 1800))))
    transformer = _load(config, device)
    _say(rank, f"transformer loaded on {device}")
    groups = make_groups(config["parallel"], heads=transformer.config.num_attention_heads)
    sync_device = device if backend == "nccl" else torch.device("cpu")
    cancel, inbox = threading.Event(), queue.Queue()
    for block in transformer.transformer_blocks:
        block.register_forward_pre_hook(_agreed_cancel_hook(cancel, sync_device))
    threading.Thread(target=_reader, args=(conn, inbox, cancel), daemon=True).start()
    send_message(conn, ("ready", rank))
    dtype = transformer.compute_dtype
    while True:
        message = inbox.get()
        kind = message[0]
        if kind == "stop":
            return
        try:
            if kind == "loras":
                from ..lora import set_loras

                report = set_loras(transformer, message[1])
                # plain data: the host may know this package under another name (a ComfyUI pack)
                send_message(conn, ("loras", rank, dataclasses.asdict(report)))
            elif kind == "call":
                cancel.clear()  # a cancel that came after the previous call had finished
                model_in, timestep, bert, t5, inpaint, control = (
                    None if t is None else t.to(device) for t in message[1:])
                text = PromptEmbeds(bert.to(dtype), t5.to(dtype))
                with torch.inference_mode(), split_transformer(transformer, groups) as model_fn:
                    pred = model_fn(transformer, model_in.to(dtype), timestep, text,
                                    None if inpaint is None else inpaint.to(dtype),
                                    None if control is None else control.to(dtype))
                if rank == 0:
                    send_message(conn, ("result", pred.float().cpu()))
            else:
                raise ValueError(f"unknown request {kind!r}")
        except Cancelled:
            from ..block_swap import reset_block_swap

            reset_block_swap(transformer)
            if rank == 0:
                send_message(conn, ("cancelled",))
        except Exception as exc:  # noqa: BLE001 - the controller reports it and stops the group
            send_message(conn, ("error", rank, f"{type(exc).__name__}: {exc}", _portable(exc), traceback.format_exc()))


def _portable(exc: BaseException):
    """(class name, message) of one of this package's user-facing errors, for the host to raise as its own;
    None for anything else."""
    from .. import errors

    name = type(exc).__name__
    return (name, str(exc)) if isinstance(exc, errors.EasyAnimateError) and hasattr(errors, name) else None


def main() -> int:
    config = _config()
    conn = Client(tuple(config["controller"]), authkey=bytes.fromhex(os.environ["EASYANIMATE_WORKER_KEY"]))
    try:
        serve(conn, config)
    except BaseException as exc:  # noqa: BLE001 - start-up failures go to the controller
        try:
            send_message(conn, ("error", int(config["rank"]), f"{type(exc).__name__}: {exc}", _portable(exc),
                                traceback.format_exc()))
        except OSError:
            pass
        return 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        conn.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
