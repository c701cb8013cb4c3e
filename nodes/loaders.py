"""Model loader node: scan models/EasyAnimate/, load a folder, hand out its three components."""
from __future__ import annotations

import os
from pathlib import Path

import torch
from comfy_api.latest import io
from torch import nn

import folder_paths

from ..easyanimate_core import auto_dtype, load_pipeline, resolve_dtype
from ..easyanimate_core.errors import ModelFolderError, UnsupportedRequestError
from ..easyanimate_core.loading import EXPECTED_TREE, download_hint
from ..easyanimate_core.lora import set_loras
from .comfy_bridge import ManagedModule, compute_device, log, offload_device
from .types import EasyAnimateModel, EasyAnimateTextEncoders, EasyAnimateVae, ModelType, TextEncodersType, VaeType

FOLDER_KEY = "easyanimate"
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
_SCAN_DEPTH = 2  # models/EasyAnimate/<name>/ or models/EasyAnimate/<group>/<name>/


def register_model_folder() -> None:
    """models/EasyAnimate/ plus any `easyanimate:` paths from extra_model_paths.yaml."""
    folder_paths.add_model_folder_path(FOLDER_KEY, os.path.join(folder_paths.models_dir, "EasyAnimate"))


def model_roots() -> list[Path]:
    return [Path(p) for p in folder_paths.get_folder_paths(FOLDER_KEY)]


def list_model_folders() -> list[str]:
    """Every folder (up to two levels down) holding transformer/config.json, as 'name' or 'group/name'."""
    found = set()
    for root in model_roots():
        if not root.is_dir():
            continue
        pending = [(root, 0)]
        while pending:
            folder, depth = pending.pop()
            if (folder / "transformer" / "config.json").is_file():
                found.add(folder.relative_to(root).as_posix())
            elif depth < _SCAN_DEPTH:
                pending.extend((sub, depth + 1) for sub in folder.iterdir() if sub.is_dir())
    return sorted(found)


def resolve_model_folder(name: str) -> Path:
    """The folder a combo value names; a clear error with the layout and download command when absent."""
    roots = model_roots()
    for root in roots:
        if (root / name).is_dir():
            return root / name
    searched = "\n".join(f"  {root}" for root in roots)
    target = roots[0] / name if roots else Path(name)
    raise ModelFolderError(
        f"EasyAnimate model folder '{name}' was not found. Searched:\n{searched}\n"
        f"Expected layout:\n{EXPECTED_TREE}\n{download_hint(target)}")


def choose_dtype(precision: str, device: torch.device) -> torch.dtype:
    if precision not in PRECISIONS:
        raise UnsupportedRequestError(f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    return auto_dtype(device) if precision == "auto" else resolve_dtype(precision)


class _LoadedCache:
    """The most recently loaded folder, reused while path, precision, device and files are unchanged."""

    def __init__(self):
        self.key = None
        self.value = None

    @staticmethod
    def key_for(folder: Path, dtype: torch.dtype, device: torch.device):
        stamps = tuple(sorted((str(p), p.stat().st_mtime_ns, p.stat().st_size)
                              for p in folder.rglob("*") if p.is_file()))
        return (str(folder.resolve()), dtype, str(device), stamps)

    def get(self, key):
        return self.value if key == self.key else None

    def put(self, key, value):
        self.key, self.value = key, value

    def clear(self):
        self.key = self.value = None


LOADED = _LoadedCache()


def load_components(name: str, precision: str = "auto"):
    """(model, text encoders, VAE) handles for a model folder, loaded once and kept on the offload device."""
    folder = resolve_model_folder(name)
    dtype = choose_dtype(precision, compute_device())
    key = _LoadedCache.key_for(folder, dtype, compute_device())
    cached = LOADED.get(key)
    if cached is not None:
        return cached
    LOADED.clear()  # let the previous model go before the next one is read
    log.info("EasyAnimate: loading %s in %s", folder, str(dtype).replace("torch.", ""))
    pipe = load_pipeline(folder, device=offload_device("diffusion"), dtype=dtype)
    vae = EasyAnimateVae(ManagedModule(pipe.vae, "vae"), name)
    encoders = pipe.text_encoders
    text = EasyAnimateTextEncoders(
        ManagedModule(nn.ModuleDict({"bert": encoders.bert, "t5": encoders.t5}), "text"), encoders, name)
    model = EasyAnimateModel(ManagedModule(pipe.transformer, "diffusion"), name, pipe.kind, pipe.scheduler_config,
                             pipe.add_noise_in_inpaint_model, dtype, vae)
    LOADED.put(key, (model, text, vae))
    return model, text, vae


class ModelLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EasyAnimateModelLoader",
            display_name="EasyAnimate Model Loader",
            category="EasyAnimate",
            description="Loads an EasyAnimate V5 model folder (diffusers layout) from models/EasyAnimate/. "
                        "The model kind (text-to-video, InP or Control) travels with the model.",
            inputs=[
                io.Combo.Input("model_name", options=list_model_folders(),
                               tooltip="A folder under models/EasyAnimate/ (e.g. EasyAnimateV5-12b-zh-InP) holding "
                                       "transformer/, vae/, text_encoder/, text_encoder_2/, tokenizer/, "
                                       "tokenizer_2/ and scheduler/."),
                io.Combo.Input("precision", options=list(PRECISIONS), default="auto",
                               tooltip="Weights and compute precision. auto: bf16 on GPUs that support it, fp16 on "
                                       "other GPUs, fp32 on the CPU. With fp16 the VAE runs in fp32 and the text "
                                       "encoders in bf16, as the original does."),
            ],
            outputs=[
                ModelType.Output("model", tooltip="The diffusion transformer (with its kind and scheduler)."),
                TextEncodersType.Output("text_encoders", tooltip="BERT + mT5 text encoders."),
                VaeType.Output("vae", tooltip="The MagViT video VAE."),
            ],
        )

    @classmethod
    def execute(cls, model_name: str, precision: str = "auto") -> io.NodeOutput:
        model, text, vae = load_components(model_name, precision)
        return io.NodeOutput(model, text, vae, ui={"text": (f"{model_name}: {model.kind} model, "
                                                             f"{str(model.dtype).replace('torch.', '')}",)})


def resolve_lora(name: str) -> Path:
    """Full path of a file in ComfyUI's loras folders, or an error naming where it was looked for."""
    path = folder_paths.get_full_path("loras", name) if name else None
    if path is None:
        folders = "\n".join(f"  {p}" for p in folder_paths.get_folder_paths("loras"))
        raise ModelFolderError(f"LoRA '{name}' was not found in:\n{folders}\nPut EasyAnimate V5 LoRA .safetensors "
                               "files there (e.g. EasyAnimateV5-12b-zh-InP-MPS.safetensors from "
                               "alibaba-pai/EasyAnimateV5-Reward-LoRAs) and refresh the page.")
    return Path(path)


class LoraLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EasyAnimateLoraLoader",
            display_name="EasyAnimate LoRA",
            category="EasyAnimate",
            description="Adds a LoRA (kohya or diffusers/peft layout) to the model. Chain several to stack them. "
                        "The base weights are never changed: the update is applied while sampling.",
            inputs=[
                ModelType.Input("model", tooltip="From the EasyAnimate Model Loader or another LoRA node."),
                io.Combo.Input("lora_name", options=folder_paths.get_filename_list("loras"),
                               tooltip="A .safetensors file in models/loras/ trained for EasyAnimate V5 (not V5.1)."),
                io.Float.Input("strength", default=0.7, min=-4.0, max=4.0, step=0.05,
                               tooltip="How strongly to apply it; 0.7 is the suggested weight of the official "
                                       "reward LoRAs. Negative values push away from it."),
            ],
            outputs=[ModelType.Output("model_with_lora", display_name="model",
                                      tooltip="The model with this LoRA added to any it already had.")],
        )

    @classmethod
    def execute(cls, model, lora_name: str, strength: float = 0.7) -> io.NodeOutput:
        path = resolve_lora(lora_name)
        patched = model.with_lora(str(path), strength)
        # Check the file against the model now, so a wrong LoRA fails on this node; the sampler sets the
        # exact list of the model it is given before every run.
        report = set_loras(patched.transformer, list(patched.loras))
        return io.NodeOutput(patched, ui={"text": (report.summary(),)})
