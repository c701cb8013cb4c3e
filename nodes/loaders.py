"""Model loader node: scan models/EasyAnimate/, load a folder, hand out its three components."""
from __future__ import annotations

import os
from pathlib import Path

import torch
from comfy_api.latest import io
from torch import nn

import folder_paths

import comfy.model_management as mm

from ..easyanimate_core import auto_dtype, load_pipeline, resolve_dtype
from ..easyanimate_core.attention import BACKENDS, DEFAULT_BACKEND, get_attention_backend, set_attention_backend
from ..easyanimate_core.block_swap import enable_block_swap
from ..easyanimate_core.download import ModelDownloadError, ensure_model, is_partial_download, official_name
from ..easyanimate_core.errors import CheckpointError, EasyAnimateError, ModelFolderError, UnsupportedRequestError
from ..easyanimate_core.loading import (EXPECTED_TREE, OFFICIAL_MODELS, PICKLE_SUFFIXES, SINGLE_FILE_SUFFIXES,
                                        download_hint, single_file_error, validate_model_dir)
from ..easyanimate_core.lora import pickle_lora_message, set_loras
from ..easyanimate_core.memory import MEMORY_MODES, plan_for_files, requested_mode
from ..easyanimate_core.models.transformer import compile_transformer_blocks
from .comfy_bridge import DownloadProgressBar, ManagedModule, compute_device, log, offload_device
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


def model_choices() -> list[str]:
    """The loader's list: the folders found, the official models not downloaded yet (fetched on first use), then
    any single-file checkpoints lying beside them (listed so that choosing one explains that they are not
    supported)."""
    found = list_model_folders()
    have = {Path(name).name for name in found}
    return (found + [name for name in OFFICIAL_MODELS if name not in have]
            + [p.name for p in _single_files(model_roots())])


def _single_files(roots: list[Path]) -> list[Path]:
    """Checkpoint files lying directly in the model folders (where a model folder belongs)."""
    return sorted(p for root in roots if root.is_dir() for p in root.iterdir()
                  if p.is_file() and p.suffix.lower() in SINGLE_FILE_SUFFIXES)


def _inside(root: Path, name: str) -> Path | None:
    """root/name when the name stays inside root (not empty, no '..', not absolute), else None. Lexical:
    model folders may be symlinks to elsewhere."""
    relative = Path(name.replace("\\", "/"))
    if not name.strip() or relative.is_absolute() or ".." in relative.parts or relative.drive:
        return None
    return root / relative


def _interrupted_download(folder: Path) -> bool:
    """A folder an interrupted download left with files missing (it resumes on the next run)."""
    if not is_partial_download(folder):
        return False
    try:
        validate_model_dir(folder)
    except ModelFolderError:
        return True
    except EasyAnimateError:
        return False  # there, but damaged: the loader says what is wrong with it
    return False


def not_downloaded(name: str) -> bool:
    """An official model the list offers that is not on disk yet (or only partly)."""
    if official_name(name) != name:
        return False
    folders = [root / name for root in model_roots() if (root / name / "transformer" / "config.json").is_file()]
    return not folders or all(_interrupted_download(folder) for folder in folders)


def resolve_model_folder(name: str) -> Path:
    """The folder a model_name value names. Values outside the list are refused (ComfyUI 0.3.75 does not
    check combo values): a path leaving models/EasyAnimate/, a single-file checkpoint. An official model that
    is absent, or that an interrupted download left incomplete, is downloaded first (ComfyUI's progress bar;
    Cancel stops it, the next run resumes). Otherwise a clear error with the layout and the download command."""
    roots = model_roots()
    listed = list_model_folders()
    searched = "\n".join(f"  {root}" for root in roots)
    for root in roots:
        inside = _inside(root, name)
        if inside is not None and inside.is_file() and inside.suffix.lower() in SINGLE_FILE_SUFFIXES:
            raise single_file_error(root / name)
    if any(_inside(root, name) is None for root in roots):
        raise ModelFolderError(
            f"model_name {name!r} is not a model folder under models/EasyAnimate/: pick one of the list "
            f"({', '.join(listed) or 'empty: add a model folder and press R'}). Searched:\n{searched}")
    found = next((root / name for root in roots if (root / name).is_dir()), None)
    official = official_name(name) == name and bool(roots)
    if found is not None and not official:
        if name not in listed:
            validate_model_dir(found)  # not listed, so incomplete: the error names the missing file
        return found
    target = found or (roots[0] / name if roots else Path(name))
    if official:
        try:
            return ensure_model(target, roots[0], progress=DownloadProgressBar(),
                                announce=lambda line: log.info("EasyAnimate: %s", line))
        except ModelDownloadError as exc:
            where = (f"EasyAnimate model folder {found} is an incomplete download and resuming it failed" if found
                     else f"EasyAnimate model folder '{name}' was not found (searched:\n{searched}\n) and "
                          "downloading it failed")
            raise ModelFolderError(f"{where}: {exc}\nExpected layout:\n{EXPECTED_TREE}") from exc
    singles = _single_files(roots)
    single_note = (f"These single-file checkpoints cannot be used ({', '.join(p.name for p in singles[:3])}): "
                   "single-file checkpoints are not supported, each model is a folder.\n" if singles else "")
    available = f"Model folders found: {', '.join(listed)}.\n" if listed else "No model folder was found.\n"
    raise ModelFolderError(
        f"EasyAnimate model folder '{name}' was not found. Searched:\n{searched}\n{available}{single_note}"
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
    def key_for(folder: Path, dtype: torch.dtype, device: torch.device, options: tuple = ()):
        stamps = tuple(sorted((str(p), p.stat().st_mtime_ns, p.stat().st_size)
                              for p in folder.rglob("*") if p.is_file()))
        return (str(folder.resolve()), dtype, str(device), options, stamps)

    def get(self, key):
        return self.value if key == self.key else None

    def put(self, key, value):
        self.key, self.value = key, value

    def clear(self):
        self.key = self.value = None


LOADED = _LoadedCache()


def plan_memory_for(folder: Path, mode: str, dtype: torch.dtype, swap_blocks: int):
    """The memory plan for a folder on ComfyUI's compute device, from the free memory the manager reports."""
    device = compute_device()
    free = (mm.get_free_memory(device), mm.get_total_memory(device)) if device.type == "cuda" else None
    return plan_for_files(validate_model_dir(folder), requested_mode(mode, swap_blocks), device, dtype,
                          swap_blocks=swap_blocks or None, free_memory=free)


def load_components(name: str, precision: str = "auto", memory_mode: str = "auto", swap_blocks: int = 0,
                    attention: str = DEFAULT_BACKEND, compile_blocks: bool = False):
    """(model, text encoders, VAE, memory plan) for a model folder, loaded once and kept on the offload device."""
    folder = resolve_model_folder(name)
    dtype = choose_dtype(precision, compute_device())
    key = _LoadedCache.key_for(folder, dtype, compute_device(), (memory_mode, swap_blocks, attention, compile_blocks))
    cached = LOADED.get(key)
    if cached is not None:
        return cached
    get_attention_backend(attention).check(compute_device(), dtype)  # before reading gigabytes of weights
    plan = plan_memory_for(folder, memory_mode, dtype, swap_blocks)
    if compile_blocks and plan.swap_blocks:
        raise UnsupportedRequestError("compile cannot be combined with block swap (its hooks stream weights in "
                                      "between blocks); turn compile off or pick a mode without block swap")
    LOADED.clear()  # let the previous model go before the next one is read
    log.info("EasyAnimate: loading %s in %s; %s", folder, str(dtype).replace("torch.", ""), plan.describe())
    pipe = load_pipeline(folder, device=offload_device("diffusion"), dtype=dtype, fp8=plan.fp8)
    transformer = pipe.transformer
    if attention != DEFAULT_BACKEND:
        set_attention_backend(transformer, attention, device=compute_device())
    if plan.swap_blocks:  # before the ModelPatcher is made: it sizes (and moves) only the resident part
        enable_block_swap(transformer, plan.swap_blocks, compute_device())
    if compile_blocks:
        compile_transformer_blocks(transformer)
    keep = not plan.offload
    vae = EasyAnimateVae(ManagedModule(pipe.vae, "vae", keep_loaded=keep), name)
    encoders = pipe.text_encoders
    text = EasyAnimateTextEncoders(
        ManagedModule(nn.ModuleDict({"bert": encoders.bert, "t5": encoders.t5}), "text", keep_loaded=keep),
        encoders, name)
    model = EasyAnimateModel(ManagedModule(transformer, "diffusion", keep_loaded=keep), name, pipe.kind,
                             pipe.scheduler_config, pipe.add_noise_in_inpaint_model, dtype, vae, folder=folder)
    LOADED.put(key, (model, text, vae, plan))
    return model, text, vae, plan


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
                io.Combo.Input("model_name", options=model_choices(),
                               tooltip="A folder under models/EasyAnimate/ (e.g. EasyAnimateV5-12b-zh-InP) holding "
                                       "transformer/, vae/, text_encoder/, text_encoder_2/, tokenizer/, "
                                       "tokenizer_2/ and scheduler/. Official models not downloaded yet are listed "
                                       "too (marked 'not downloaded'): the first run downloads them from the Hugging "
                                       "Face Hub into models/EasyAnimate/ (tens of GB: the size is printed first), "
                                       "with the progress bar; Cancel stops it and the next run resumes. "
                                       "Single-file checkpoints are not supported."),
                io.Combo.Input("precision", options=list(PRECISIONS), default="auto",
                               tooltip="Weights and compute precision. auto: bf16 on GPUs that support it, fp16 on "
                                       "other GPUs, fp32 on the CPU. With fp16 the VAE runs in fp32 and the text "
                                       "encoders in bf16, as the original does."),
                io.Combo.Input("memory_mode", options=list(MEMORY_MODES), default="auto",
                               tooltip="Where the weights live. auto: the first of the modes below that fits the "
                                       "GPU's free memory (printed under the node). gpu: everything stays loaded. "
                                       "offload: each component on the GPU only while used. fp8: offload + fp8 "
                                       "transformer weights (half the memory, slight quality change). block_swap / "
                                       "fp8_block_swap: offload + the last swap_blocks transformer blocks streamed "
                                       "from CPU memory each step (the least VRAM)."),
                io.Int.Input("swap_blocks", default=0, min=0, max=64,
                             tooltip="Transformer blocks streamed from CPU memory in the block-swap modes; 0 = the "
                                     "fewest that fit the free GPU memory. Each 12B block is about 0.5 GB in bf16."),
                io.Combo.Input("attention", options=list(BACKENDS), default=DEFAULT_BACKEND,
                               tooltip="sdpa: PyTorch's attention (default). flash: the flash-attn package. sage: "
                                       "the sageattention package (faster, approximate). Both need a CUDA GPU and "
                                       "bf16/fp16; a clear error says what to install when missing."),
                io.Boolean.Input("compile", default=False,
                                 tooltip="torch.compile the transformer blocks: the first run at each resolution "
                                         "compiles (a minute or more), later steps are faster. Not with block swap."),
            ],
            outputs=[
                ModelType.Output("model", tooltip="The diffusion transformer (with its kind and scheduler)."),
                TextEncodersType.Output("text_encoders", tooltip="BERT + mT5 text encoders."),
                VaeType.Output("vae", tooltip="The MagViT video VAE."),
            ],
        )

    @classmethod
    def execute(cls, model_name: str, precision: str = "auto", memory_mode: str = "auto", swap_blocks: int = 0,
                attention: str = DEFAULT_BACKEND, compile: bool = False) -> io.NodeOutput:
        model, text, vae, plan = load_components(model_name, precision, memory_mode, swap_blocks, attention, compile)
        summary = f"{model_name}: {model.kind} model, {str(model.dtype).replace('torch.', '')}"
        return io.NodeOutput(model, text, vae, ui={"text": (summary, plan.describe())})


def lora_files() -> list[str]:
    """The LoRA list: .safetensors files in ComfyUI's loras folders (pickles are never loaded)."""
    return [name for name in folder_paths.get_filename_list("loras") if name.lower().endswith(".safetensors")]


def resolve_lora(name: str) -> Path:
    """Full path of a listed LoRA file; a pickle is refused saying why, anything else not listed as not found."""
    if Path(name or "").suffix.lower() in PICKLE_SUFFIXES:
        raise CheckpointError(pickle_lora_message(Path(name)))
    path = folder_paths.get_full_path("loras", name) if name in lora_files() else None
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
                io.Combo.Input("lora_name", options=lora_files(),
                               tooltip="A .safetensors file in models/loras/ trained for EasyAnimate V5 (not V5.1). "
                                       ".pt/.bin files are not listed: pickles are never loaded, for safety."),
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
