"""Training nodes: a dataset (folder or IMAGE batch + captions) and Train LoRA (saves into models/loras/)."""
from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import folder_paths
import torch
from comfy_api.latest import io

from ..easyanimate_core.errors import UnsupportedRequestError
from ..easyanimate_core.lora import set_loras
from ..easyanimate_core.training import TARGET_SETS
from ..easyanimate_core.training.cache import (DEFAULT_CACHE_DIR, build_cache, module_fingerprint,
                                               samples_from_frames, training_text_embeds)
from ..easyanimate_core.training.dataset import (CAPTION_POLICIES, DatasetSettings, items_from_images,
                                                 scan_folder)
from ..easyanimate_core.training.loop import TrainConfig, state_path, train_lora
from ..easyanimate_core.training.plot import loss_curve_image
from .comfy_bridge import check_interrupted, log
from .conditioning import CATEGORY, check_choice, ui_text
from .types import ModelType, TextEncodersType, VaeType

TrainingDataType = io.Custom("EASYANIMATE_TRAINING_DATA")
TRAIN_CATEGORY = f"{CATEGORY}/training"


@dataclass(frozen=True)
class TrainingData:
    """What the dataset node hands to Train LoRA: files on disk, or in-memory images with captions."""

    settings: DatasetSettings
    items: tuple = ()                 # TrainItem, for a folder
    frames: tuple = ()                # (TrainItem, [1,H,W,3]) pairs, for an IMAGE batch
    cache_dir: Path | None = None
    notes: tuple = field(default=())

    def __len__(self) -> int:
        return len(self.items) or len(self.frames)


class TrainingDataset(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EasyAnimateTrainingDataset",
            display_name="EasyAnimate Training Dataset",
            category=TRAIN_CATEGORY,
            description="Training samples for EasyAnimate Train LoRA: a folder of images/videos with same-name .txt "
                        "captions (or the original's JSON list), or an IMAGE batch with one caption per line.",
            inputs=[
                io.String.Input("folder", default="",
                                tooltip="Folder of images (.png .jpg .webp) and videos (.mp4 .webm ...) with same-name "
                                        ".txt captions, or a JSON list file. Relative paths are inside ComfyUI's input "
                                        "folder. Leave empty to train on the images input instead."),
                io.Int.Input("resolution", default=512, min=64, max=1024, step=16,
                             tooltip="Bucket base side for a max_frames video (512 = 512x512x49 token budget); "
                                     "images and shorter clips get larger sides at the same budget."),
                io.Int.Input("max_frames", default=49, min=1, max=49, step=4,
                             tooltip="Frames per video clip (4k+1); images always train as 1 frame."),
                io.Int.Input("image_resolution", default=1024, min=64, max=1024, step=16,
                             tooltip="Largest bucket base side, reached by images (the original trains images at "
                                     "1024)."),
                io.Int.Input("repeat", default=1, min=1, max=100, tooltip="Times each sample appears per epoch."),
                io.Combo.Input("missing_captions", options=list(CAPTION_POLICIES), default="refuse",
                               tooltip="refuse: stop and list files without a .txt caption. filename: use the file "
                                       "name (underscores as spaces) as the caption."),
                io.Image.Input("images", optional=True,
                               tooltip="Train on these images instead of a folder (each a 1-frame video)."),
                io.String.Input("captions", multiline=True, default="", optional=True,
                                tooltip="With images: one caption per line, one line per image (or a single line "
                                        "for all)."),
            ],
            outputs=[TrainingDataType.Output("dataset", tooltip="For EasyAnimate Train LoRA.")],
        )

    @classmethod
    def execute(cls, folder: str = "", resolution: int = 512, max_frames: int = 49, image_resolution: int = 1024,
                repeat: int = 1, missing_captions: str = "refuse", images=None, captions: str = "") -> io.NodeOutput:
        check_choice("missing_captions", missing_captions, CAPTION_POLICIES)
        settings = DatasetSettings(resolution, max_frames, max(image_resolution, resolution))
        if folder.strip():
            path = Path(folder.strip()).expanduser()
            path = path if path.is_absolute() else Path(folder_paths.get_input_directory()) / path
            items = tuple(scan_folder(path, missing_captions, repeat))
            cache = (path if path.is_dir() else path.parent) / DEFAULT_CACHE_DIR
            data = TrainingData(settings, items=items, cache_dir=cache)
            text = f"{len(items)} files from {path} (cache: {cache})"
        elif images is not None:
            lines = [line for line in (captions or "").splitlines() if line.strip()]
            if not lines:
                raise UnsupportedRequestError("give the images' captions: one line per image (or one for all)")
            pairs = tuple((replace(item, repeat=repeat), frames)
                          for item, frames in items_from_images(images.float().cpu(), lines))
            data = TrainingData(settings, frames=pairs)
            text = f"{len(pairs)} images with captions (kept in memory, not cached on disk)"
        else:
            raise UnsupportedRequestError("connect images (with captions) or give a dataset folder")
        return io.NodeOutput(data, ui=ui_text([text]))


class _NodeEncoders:
    """The loader's VAE and text encoders as the training cache wants them, each loaded only while used."""

    def __init__(self, model, text_encoders, vae):
        self.kind, self.vae, self.text = model.kind, vae, text_encoders
        self.vae_fingerprint = module_fingerprint(vae.vae)
        self.text_fingerprint = module_fingerprint(text_encoders.encoders.bert) + \
            module_fingerprint(text_encoders.encoders.t5)

    def encode_video(self, pixels):
        with torch.inference_mode(), self.vae.module.in_use() as vae:
            posterior = vae.encode(pixels.to(self.vae.module.device, vae.dtype))
            mean, std = posterior.mean.to("cpu", torch.float32), posterior.std.to("cpu", torch.float32)
        return mean.clone(), std.clone()

    def encode_text(self, caption: str):
        with self.text.module.in_use():
            return training_text_embeds(self.text.encoders, caption)


class _ModelView:
    """What train_lora needs of a pipeline: the transformer and its scheduler config."""

    def __init__(self, model):
        self.transformer, self.scheduler_config, self.kind = model.transformer, model.scheduler_config, model.kind


def _output_path(name: str) -> Path:
    clean = re.sub(r"[^\w.\- ]+", "_", name.strip()).strip(". ")
    if not clean:
        raise UnsupportedRequestError("output_name is empty: give the LoRA file a name (e.g. my_style)")
    clean = clean if clean.endswith(".safetensors") else clean + ".safetensors"
    return Path(folder_paths.get_folder_paths("loras")[0]) / clean


class TrainLora(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EasyAnimateTrainLoRA",
            display_name="EasyAnimate Train LoRA",
            category=TRAIN_CATEGORY,
            description="Trains a LoRA on the dataset with the original trainer's objective and saves it into "
                        "models/loras/. Outputs the model with the new LoRA (for the sampler or a LoRA node) and "
                        "the loss curve. Cancel saves the steps trained so far.",
            inputs=[
                ModelType.Input("model", tooltip="From the EasyAnimate Model Loader (memory_mode fp8 stores the "
                                                 "frozen weights in fp8; block_swap streams blocks in forward and "
                                                 "backward). LoRAs already on it stay applied while training."),
                TextEncodersType.Input("text_encoders", tooltip="From the loader: encodes the captions (cached)."),
                VaeType.Input("vae", tooltip="From the loader: encodes the images/videos (cached)."),
                TrainingDataType.Input("dataset", tooltip="From EasyAnimate Training Dataset."),
                io.Int.Input("steps", default=500, min=1, max=100000, tooltip="Optimizer steps (one sample each)."),
                io.Float.Input("learning_rate", default=1e-4, min=1e-7, max=1e-1, step=1e-5, round=1e-7,
                               tooltip="AdamW learning rate (the original's default 1e-4)."),
                io.Int.Input("rank", default=32, min=1, max=256,
                             tooltip="LoRA rank: 32 fits users' GPUs; the original uses 128."),
                io.Float.Input("alpha", default=32.0, min=0.1, max=512.0, step=0.5,
                               tooltip="LoRA alpha: the update is scaled by alpha / rank (the original: 64 at rank 128)."),
                io.Int.Input("seed", default=42, min=0, max=2 ** 31 - 1, control_after_generate=True,
                             tooltip="Seeds the LoRA init, the sample order, the noise and the timesteps."),
                io.Combo.Input("targets", options=list(TARGET_SETS), default="all",
                               tooltip="all: every Linear of the transformer (as the original). attention: only the "
                                       "attention q/k/v/out projections (a smaller file)."),
                io.Boolean.Input("gradient_checkpointing", default=True,
                                 tooltip="Recompute each block in the backward: much less memory, about a third "
                                         "more time. Always on with block swap."),
                io.String.Input("output_name", default="my_easyanimate_lora",
                                tooltip="File name in models/loras/ (.safetensors is added). An existing file of "
                                        "that name is replaced when the run saves."),
                io.Int.Input("save_every", default=0, min=0, max=100000,
                             tooltip="Also save every N steps (0: at the end and on Cancel only)."),
                io.Int.Input("warmup_steps", default=0, min=0, max=10000,
                             tooltip="Linear learning-rate warm-up steps; constant afterwards."),
                io.Float.Input("caption_dropout", default=0.1, min=0.0, max=0.9, step=0.05,
                               tooltip="Probability of training a step on the empty caption (the original: 0.1)."),
                io.String.Input("trigger_words", default="", tooltip="Stored in the file's metadata."),
                io.Boolean.Input("resume", default=False,
                                 tooltip="Continue the file output_name from its last save (its .state.pt holds "
                                         "the optimizer state) up to steps."),
                io.Boolean.Input("rebuild_cache", default=False,
                                 tooltip="Re-encode every file instead of using the cached latents."),
            ],
            outputs=[
                ModelType.Output("model_with_lora", display_name="model",
                                 tooltip="The input model with the trained LoRA at strength 1."),
                io.String.Output("lora_name", tooltip="The file's name in models/loras/."),
                io.Image.Output("loss_curve", tooltip="Loss per step and its running mean."),
            ],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, text_encoders, vae, dataset, steps: int = 500, learning_rate: float = 1e-4,
                rank: int = 32, alpha: float = 32.0, seed: int = 42, targets: str = "all",
                gradient_checkpointing: bool = True, output_name: str = "my_easyanimate_lora", save_every: int = 0,
                warmup_steps: int = 0, caption_dropout: float = 0.1, trigger_words: str = "", resume: bool = False,
                rebuild_cache: bool = False) -> io.NodeOutput:
        import comfy.utils

        check_choice("targets", targets, TARGET_SETS)
        out = _output_path(output_name)
        config = TrainConfig(steps=steps, rank=rank, alpha=alpha, lr=learning_rate, seed=seed, targets=targets,
                             warmup_steps=warmup_steps, save_every=save_every, caption_dropout=caption_dropout,
                             gradient_checkpointing=gradient_checkpointing, trigger_words=trigger_words)
        config.validate()
        encoders = _NodeEncoders(model, text_encoders, vae)
        node_id = cls.hidden.unique_id if cls.hidden is not None else None
        cache_bar = comfy.utils.ProgressBar(len(dataset))
        if dataset.items:
            samples = build_cache(encoders, list(dataset.items), dataset.settings, dataset.cache_dir,
                                  rebuild=rebuild_cache, progress=lambda i, n, name: (check_interrupted(),
                                                                                      cache_bar.update_absolute(i, n)))
        else:
            samples = samples_from_frames(encoders, list(dataset.frames), dataset.settings)
        empty = encoders.encode_text("")

        bar = comfy.utils.ProgressBar(steps)
        start = 0
        if resume and state_path(out).is_file():
            start = int(torch.load(state_path(out), map_location="cpu", weights_only=False)["trainer"]["global_step"])

        def progress(step: int, total: int, loss: float) -> None:
            bar.update_absolute(step, total)
            _progress_text(f"step {step}/{total}  loss {loss:.4f}", node_id)
            check_interrupted()  # Cancel: train_lora saves the steps done, then the interrupt propagates

        with model.module.in_use():
            set_loras(model.transformer, list(model.loras))  # train on top of exactly this model
            result = train_lora(_ModelView(model), samples, empty, config, out, resume=resume,
                                base_model=model.name, log_csv=out.with_suffix(".csv"), callback=progress,
                                transformer_context=_null(), vae_scaling_factor=vae.vae.scaling_factor)
        log.info("EasyAnimate Train LoRA: wrote %s (%d steps)", out, result.steps_done)
        trained = model.with_lora(str(out), 1.0)
        done = result.steps_done - start
        notes = [f"saved {out.name} in {out.parent}: {result.steps_done} steps ({done} this run), rank {rank}, "
                 f"alpha {alpha:g}, {len(samples)} samples, last loss {result.losses[-1]:.4f}"]
        return io.NodeOutput(trained, out.name, loss_curve_image(result.losses), ui=ui_text(notes))


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return None


def _progress_text(text: str, node_id) -> None:
    """The current loss under the node (where this ComfyUI version supports progress text)."""
    try:
        from server import PromptServer

        if node_id is not None and hasattr(PromptServer.instance, "send_progress_text"):
            PromptServer.instance.send_progress_text(text, node_id)
    except Exception:  # the text is a convenience; training goes on without it
        pass
