"""Multi-GPU loader node: the transformer runs in a kept group of worker processes, one per GPU.

The ComfyUI process keeps the text encoders, the VAE and the sampling loop; each step's transformer
call goes to the workers (easyanimate_core.parallel.workers), which split it by CFG half and/or by
sequence (Ulysses). The workers start when the node first runs and are reused while its inputs stay
the same; Cancel reaches them mid-step; a dead worker fails the run with a clear error and the next
run starts fresh workers.
"""
from __future__ import annotations

import atexit

import torch
from comfy_api.latest import io
from torch import nn

from ..easyanimate_core import load_vae
from ..easyanimate_core.attention import BACKENDS, DEFAULT_BACKEND, get_attention_backend
from ..easyanimate_core.errors import UnsupportedRequestError
from ..easyanimate_core.loading import validate_model_dir
from ..easyanimate_core.models.transformer import TransformerConfig
from ..easyanimate_core.parallel import ParallelError, ParallelSpec
from ..easyanimate_core.parallel.workers import RemoteTransformer, WorkerGroup
from ..easyanimate_core.text import TextEncoders
from .comfy_bridge import ManagedModule, check_interrupted, compute_device, log, offload_device
from .loaders import PRECISIONS, choose_dtype, list_model_folders, resolve_model_folder
from .types import EasyAnimateModel, EasyAnimateTextEncoders, EasyAnimateVae, ModelType, TextEncodersType, VaeType

LAYOUTS = ("auto", "cfg+ulysses", "ulysses", "cfg")
TRANSFORMER_MEMORY = ("gpu", "fp8", "block_swap", "fp8_block_swap")


def choose_layout(layout: str, gpus: int, heads: int) -> ParallelSpec:
    """The split for `gpus` workers. auto: cfg=2 when the count is even (no traffic inside a step),
    Ulysses over the rest."""
    if layout not in LAYOUTS:
        raise UnsupportedRequestError(f"layout must be one of {', '.join(LAYOUTS)}; got {layout!r}")
    if layout == "ulysses":
        spec = ParallelSpec(ulysses=gpus)
    elif layout == "cfg":
        if gpus != 2:
            raise ParallelError(f"layout cfg splits the two guided halves over exactly 2 GPUs, not {gpus}; use "
                                "cfg+ulysses or ulysses for more")
        spec = ParallelSpec(cfg=2)
    elif gpus % 2 == 0:
        spec = ParallelSpec(ulysses=gpus // 2, cfg=2)
    elif layout == "auto":
        spec = ParallelSpec(ulysses=gpus)
    else:
        raise ParallelError(f"layout cfg+ulysses needs an even number of GPUs, not {gpus}")
    spec.check_heads(heads)
    return spec


def worker_devices(gpus: int) -> list[str]:
    """cuda:0 … cuda:N-1 on a GPU machine; N CPU worker processes (gloo) when ComfyUI runs on the CPU."""
    device = compute_device()
    if device.type != "cuda":
        return ["cpu"] * gpus
    count = torch.cuda.device_count()
    if gpus > count:
        raise ParallelError(f"{gpus} GPUs were asked for but this machine has {count}; set gpus to at most {count}")
    return [f"cuda:{i}" for i in range(gpus)]


class _Workers:
    """The one kept worker group (a new configuration stops the previous group first, freeing its GPUs)."""

    def __init__(self):
        self.key, self.group, self.outputs = None, None, None

    def get(self, key, make):
        if key != self.key or self.group is None:
            self.close()
            self.group = make()
            self.key = key
            self.outputs = None
        self.group.start()  # no-op while running; restarts a group stopped by a failure
        return self.group

    def close(self):
        if self.group is not None:
            self.group.close()
        self.key, self.group, self.outputs = None, None, None


WORKERS = _Workers()
atexit.register(WORKERS.close)


class MultiGPULoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EasyAnimateMultiGPULoader",
            display_name="EasyAnimate Multi-GPU Loader",
            category="EasyAnimate",
            description="Loads an EasyAnimate V5 model with its transformer on several GPUs: one worker process per "
                        "GPU, started once and kept. Same outputs as the Model Loader; the same seed gives the same "
                        "video as one GPU.",
            inputs=[
                io.Combo.Input("model_name", options=list_model_folders(),
                               tooltip="A folder under models/EasyAnimate/ (e.g. EasyAnimateV5-12b-zh-InP)."),
                io.Combo.Input("precision", options=list(PRECISIONS), default="auto",
                               tooltip="Weights and compute precision (as on the Model Loader)."),
                io.Int.Input("gpus", default=2, min=2, max=16,
                             tooltip="How many GPUs (worker processes) run the transformer: cuda:0 … cuda:N-1. With "
                                     "ComfyUI on the CPU (--cpu) these are CPU processes (for testing)."),
                io.Combo.Input("layout", options=list(LAYOUTS), default="auto",
                               tooltip="How a step is split. cfg: the unconditional and conditional halves on two "
                                       "GPUs (no traffic during the step; needs cfg > 1 to help). ulysses: each GPU "
                                       "holds 1/N of the video tokens (N must divide the 48 heads: 2, 3, 4, 6, 8…). "
                                       "cfg+ulysses: both (2 × N GPUs). auto: cfg+ulysses for an even count, "
                                       "otherwise ulysses."),
                io.Combo.Input("transformer_memory", options=list(TRANSFORMER_MEMORY), default="gpu",
                               tooltip="Per GPU. gpu: the whole transformer on each GPU (bf16 12B: about 24 GB). "
                                       "fp8: fp8 weights (half). block_swap / fp8_block_swap: the last swap_blocks "
                                       "blocks streamed from CPU memory each step."),
                io.Int.Input("swap_blocks", default=8, min=0, max=64,
                             tooltip="Blocks streamed from CPU memory per GPU in the block-swap modes (each 12B block "
                                     "is about 0.5 GB in bf16); ignored otherwise."),
                io.Combo.Input("attention", options=list(BACKENDS), default=DEFAULT_BACKEND,
                               tooltip="Attention backend in the workers (as on the Model Loader)."),
            ],
            outputs=[
                ModelType.Output("model", tooltip="The transformer, run by the worker processes."),
                TextEncodersType.Output("text_encoders", tooltip="BERT + mT5 text encoders (in this process)."),
                VaeType.Output("vae", tooltip="The MagViT video VAE (in this process)."),
            ],
        )

    @classmethod
    def execute(cls, model_name: str, precision: str = "auto", gpus: int = 2, layout: str = "auto",
                transformer_memory: str = "gpu", swap_blocks: int = 8,
                attention: str = DEFAULT_BACKEND) -> io.NodeOutput:
        if transformer_memory not in TRANSFORMER_MEMORY:
            raise UnsupportedRequestError(f"transformer_memory must be one of {', '.join(TRANSFORMER_MEMORY)}")
        folder = resolve_model_folder(model_name)
        files = validate_model_dir(folder)
        heads = TransformerConfig.from_dict(files.transformer_config).num_attention_heads
        spec = choose_layout(layout, gpus, heads)
        devices = worker_devices(gpus)
        dtype = choose_dtype(precision, compute_device())
        get_attention_backend(attention).check(torch.device(devices[0]), dtype)
        fp8 = transformer_memory.startswith("fp8")
        swap = swap_blocks if "block_swap" in transformer_memory else 0
        key = (str(folder.resolve()), str(dtype), str(spec), tuple(devices), fp8, swap, attention)

        def make():
            log.info("EasyAnimate: starting %d workers for %s (%s) on %s", gpus, folder, spec, ", ".join(devices))
            return WorkerGroup(folder, spec, devices=devices, dtype=dtype, fp8=fp8, swap_blocks=swap,
                               attention=attention)

        group = WORKERS.get(key, make)
        if WORKERS.outputs is None:
            WORKERS.outputs = _host_components(files, model_name, dtype, group)
        model, text, vae = WORKERS.outputs
        summary = (f"{model_name}: {model.kind} model, {str(dtype).replace('torch.', '')}, transformer on "
                   f"{gpus} workers ({spec}; {', '.join(devices)}; {transformer_memory})")
        return io.NodeOutput(model, text, vae, ui={"text": (summary, f"workers started {group.starts}x")})


def _host_components(files, name: str, dtype: torch.dtype, group: WorkerGroup):
    """(model, text encoders, VAE): the VAE and text encoders loaded here, the transformer a stand-in for the workers."""
    text_dtype = torch.bfloat16 if dtype == torch.float16 else dtype
    encoders = TextEncoders.from_model_dir(files.root, dtype=text_dtype, device=offload_device("text"))
    vae = EasyAnimateVae(ManagedModule(load_vae(files, dtype=dtype, device=offload_device("vae")), "vae"), name)
    text = EasyAnimateTextEncoders(ManagedModule(nn.ModuleDict({"bert": encoders.bert, "t5": encoders.t5}), "text"),
                                   encoders, name)
    remote = RemoteTransformer(group, poll=check_interrupted)
    model = EasyAnimateModel(ManagedModule(remote, "diffusion", keep_loaded=True), name, files.kind,
                             files.scheduler_config,
                             bool(files.transformer_config.get("add_noise_in_inpaint_model", False)), dtype, vae,
                             folder=files.root)
    return model, text, vae
