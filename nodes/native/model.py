"""EasyAnimate V5 as a ComfyUI MODEL: a comfy BaseModel whose diffusion model is our transformer.

What ComfyUI's samplers need to know about V5 lives here: the model sampling (the scheduler_config.json
betas, v-prediction, zero-terminal-SNR), the latent format (16 channels, scale 0.7125, latent→RGB
factors fitted to the folder's VAE) and how conditioning reaches the transformer:

- CONDITIONING from EasyAnimate Text Encode (Conditioning): the BERT states are the cross-attention
  tensor, the mT5 states ride along under T5_KEY;
- inpaint latents (17 channels: mask + masked video) or control latents (16 channels) ride along
  under INPAINT_KEY / CONTROL_KEY and become `c_concat`, concatenated to the noisy latents on the
  channel axis exactly as the transformer's own inpaint/control inputs are. Being CONDNoiseShape,
  they are sliced along the frame axis by ComfyUI's context windows (0.33 does it itself; for
  0.3.75, whose generic slicing misses 5-D concat conditioning, `_apply_model` slices them by the
  window the context handler announces).

The weights are shared with the EasyAnimate nodes: one BaseModel per loaded folder, every MODEL a
ModelPatcher clone of it, so ComfyUI's memory manager sees one model whichever nodes use it.
"""
from __future__ import annotations

import torch
from torch import nn

import comfy.conds
import comfy.latent_formats
import comfy.model_base
import comfy.model_management as mm
import comfy.model_patcher
import comfy.patcher_extension
import comfy.supported_models_base

from ...easyanimate_core.block_swap import reset_block_swap
from ...easyanimate_core.errors import UnsupportedRequestError
from ...easyanimate_core.fp8 import Fp8Linear
from ...easyanimate_core.lora import set_loras

LATENT_CHANNELS = 16
T5_KEY = "easyanimate_t5"
INPAINT_KEY = "easyanimate_inpaint"
CONTROL_KEY = "easyanimate_control"
LORAS_OPTION = "easyanimate_loras"   # model_options key: our hook LoRAs (EasyAnimate LoRA nodes) to set per run
TEXT_NODE = "EasyAnimate Text Encode (Conditioning)"
LATENT_NODES = "EasyAnimate Empty Video Latent, EasyAnimate VAE Encode or EasyAnimate Video Conditioning"
# diffusers beta_schedule → ComfyUI's name for the same betas
_BETA_SCHEDULES = {"scaled_linear": "linear", "linear": "sqrt_linear"}
_PREDICTIONS = {"v_prediction": comfy.model_base.ModelType.V_PREDICTION, "epsilon": comfy.model_base.ModelType.EPS}


class EasyAnimateLatentFormat(comfy.latent_formats.LatentFormat):
    """The V5 MagViT latent: 16 channels, 8x spatial and 4x temporal compression, scale 0.7125."""

    latent_channels = LATENT_CHANNELS
    latent_dimensions = 3
    spacial_downscale_ratio = 8
    temporal_downscale_ratio = 4

    def __init__(self, scale_factor: float = 0.7125, rgb_factors=None, rgb_bias=None):
        self.scale_factor = float(scale_factor)
        self.latent_rgb_factors = rgb_factors
        self.latent_rgb_factors_bias = rgb_bias


class EasyAnimateV5Config(comfy.supported_models_base.BASE):
    """The model config ComfyUI reads: no unet to build (ours is loaded), V5 sampling, V5 latents."""

    unet_config = {"disable_unet_model_creation": True}
    unet_extra_config = {}
    latent_format = EasyAnimateLatentFormat
    memory_usage_factor = 2.0
    supported_inference_dtypes = [torch.bfloat16, torch.float16, torch.float32]


def sampling_settings(scheduler_config: dict) -> dict:
    """ComfyUI's discrete sampling settings for a V5 scheduler_config.json."""
    schedule = scheduler_config.get("beta_schedule", "scaled_linear")
    if schedule not in _BETA_SCHEDULES:
        raise UnsupportedRequestError(f"scheduler_config.json: beta_schedule {schedule!r} is not supported "
                                      f"(expected one of {', '.join(_BETA_SCHEDULES)})")
    return {"beta_schedule": _BETA_SCHEDULES[schedule],
            "linear_start": float(scheduler_config.get("beta_start", 0.00085)),
            "linear_end": float(scheduler_config.get("beta_end", 0.012)),
            "timesteps": int(scheduler_config.get("num_train_timesteps", 1000)),
            "zsnr": bool(scheduler_config.get("rescale_betas_zero_snr", False))}


def model_type(scheduler_config: dict):
    prediction = scheduler_config.get("prediction_type", "v_prediction")
    if prediction not in _PREDICTIONS:
        raise UnsupportedRequestError(f"scheduler_config.json: prediction_type {prediction!r} is not supported")
    return _PREDICTIONS[prediction]


def has_fp8_weights(module: nn.Module) -> bool:
    return any(isinstance(m, Fp8Linear) for m in module.modules())


class EasyAnimateDiffusionModel(nn.Module):
    """ComfyUI's diffusion-model call convention around our transformer (which stays ComfyUI-free).

    `x` arrives with the concat conditioning already on its channel axis, which is exactly what the
    transformer concatenates itself ([latents | inpaint | control]); DIFFUSION_MODEL wrappers (EasyCache,
    ...) run around the call.
    """

    def __init__(self, transformer: nn.Module, kind: str):
        super().__init__()
        self.transformer = transformer
        self.kind = kind

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.compute_dtype

    def forward(self, x, timestep, context=None, t5_context=None, control=None, transformer_options={}, **kwargs):
        return comfy.patcher_extension.WrapperExecutor.new_class_executor(
            self._forward, self,
            comfy.patcher_extension.get_all_wrappers(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL,
                                                     transformer_options),
        ).execute(x, timestep, context, t5_context, control, transformer_options, **kwargs)

    def _forward(self, x, timestep, context, t5_context, control, transformer_options, **kwargs):
        expected = self.transformer.config.in_channels
        if x.shape[1] != expected:
            raise UnsupportedRequestError(
                f"the EasyAnimate transformer takes {expected} input channels but got {x.shape[1]}: the latent or "
                f"the image/video conditioning does not belong to this {self.kind} model")
        try:
            return self.transformer(x, timestep, context, t5_context)
        except BaseException:
            reset_block_swap(self.transformer)  # an interrupt inside a swapped block leaves nothing behind
            raise


class EasyAnimateBaseModel(comfy.model_base.BaseModel):
    """A ComfyUI BaseModel over a loaded EasyAnimate V5 transformer."""

    def __init__(self, model_config: EasyAnimateV5Config, transformer: nn.Module, kind: str, scheduler_config: dict,
                 device=None):
        super().__init__(model_config, model_type(scheduler_config), device=device)
        self.diffusion_model = EasyAnimateDiffusionModel(transformer, kind)
        self.kind = kind

    @property
    def transformer(self) -> nn.Module:
        return self.diffusion_model.transformer

    easyanimate_transformer = transformer  # what the LoRA key map (lora_keys.py) looks for

    # ------------------------------------------------------------------ conditioning
    def extra_conds(self, **kwargs):
        noise = kwargs.get("noise")
        if noise is not None:
            check_latent(noise)
        cross_attn, t5 = kwargs.get("cross_attn"), kwargs.get(T5_KEY)
        config = self.transformer.config
        if t5 is None or cross_attn is None or cross_attn.shape[-1] != config.text_embed_dim:
            got = "no text" if cross_attn is None else f"text states of width {cross_attn.shape[-1]}"
            raise UnsupportedRequestError(
                f"this CONDITIONING is not from EasyAnimate ({got}, no mT5 states): EasyAnimate needs BERT + mT5 "
                f"prompt states. Connect positive/negative from '{TEXT_NODE}' (fed by the EasyAnimate Model "
                "Loader's text_encoders), not a CLIP Text Encode of another model family.")
        out = super().extra_conds(**kwargs)
        out["t5_context"] = comfy.conds.CONDRegular(t5)
        concat = self._concat_latents(kwargs.get(INPAINT_KEY), kwargs.get(CONTROL_KEY), noise)
        if concat is not None:
            out["c_concat"] = comfy.conds.CONDNoiseShape(concat)
        return out

    def _concat_latents(self, inpaint, control, noise):
        """The extra input channels for this model kind, checked against the kind and the latent."""
        if self.kind == "t2v" and (inpaint is not None or control is not None):
            raise UnsupportedRequestError(
                "this is an EasyAnimate V5 text-to-video (T2V) model; it cannot take image/video/control "
                "conditioning. Load an InP model (images, masks) or a Control model (control videos).")
        if self.kind == "inpaint" and control is not None:
            raise UnsupportedRequestError("this InP model cannot take a control video: load EasyAnimateV5-12b-zh-Control")
        if self.kind == "control" and control is None:
            raise UnsupportedRequestError(
                "a Control model needs a control video: connect positive/negative through 'EasyAnimate Video "
                "Conditioning' with control_video, or load a T2V/InP model for text-to-video")
        if self.kind == "control" and inpaint is not None:
            raise UnsupportedRequestError("a Control model cannot take start/end images or masks: load an InP model")
        extra = {"inpaint": inpaint, "control": control}.get(self.kind)
        if self.kind == "inpaint" and extra is None and noise is not None:
            # Nothing known: the original feeds literal zeros for the mask and the masked video.
            extra = torch.zeros((noise.shape[0], 1 + LATENT_CHANNELS) + tuple(noise.shape[2:]))
        if extra is not None and noise is not None and tuple(extra.shape[2:]) != tuple(noise.shape[2:]):
            raise UnsupportedRequestError(
                f"the image/video conditioning is for a latent of {tuple(extra.shape[2:])} (frames, h, w) but the "
                f"latent is {tuple(noise.shape[2:])}: feed the sampler the latent output of the same "
                "EasyAnimate Video Conditioning node")
        return extra

    def _apply_model(self, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kwargs):
        if c_concat is not None and c_concat.shape[2] != x.shape[2]:
            window = transformer_options.get("context_window")
            if window is None:
                raise UnsupportedRequestError(
                    f"concat conditioning has {c_concat.shape[2]} latent frames, the latent {x.shape[2]}")
            c_concat = window.get_tensor(c_concat, device=x.device, dim=2)
        return super()._apply_model(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)


def check_latent(samples: torch.Tensor) -> None:
    """Refuse latents of other model families with what to connect instead."""
    if samples.dim() != 5 or samples.shape[1] != LATENT_CHANNELS:
        raise UnsupportedRequestError(
            f"EasyAnimate samples video latents [batch, 16, frames, height/8, width/8]; this latent is "
            f"{list(samples.shape)} (a {samples.shape[1]}-channel latent of another model family). Connect "
            f"{LATENT_NODES} to the sampler's latent_image.")


class EasyAnimateModelPatcher(comfy.model_patcher.ModelPatcher):
    """The ModelPatcher of our BaseModel (and of every clone ComfyUI's nodes make of it).

    - Loads the transformer whole: its layers are plain torch modules (not comfy.ops casting layers),
      so ComfyUI cannot leave some of them on the CPU and cast per call; the memory options of the
      EasyAnimate Model Loader (fp8, block swap) are what lowers its VRAM, and the memory manager can
      still unload it to make room for other models.
    - Sets the hook LoRAs of the EasyAnimate LoRA nodes the MODEL was made from before each run.
    - Refuses ComfyUI weight patches (LoraLoaderModelOnly) on fp8 weights, whose per-row scales ComfyUI
      does not know.
    """

    def load(self, device_to=None, lowvram_model_memory=0, force_patch_weights=False, full_load=False, **kwargs):
        if self.patches and has_fp8_weights(self.model.transformer):
            raise UnsupportedRequestError(
                "ComfyUI's LoRA loaders patch weights, and this EasyAnimate model stores fp8 weights with per-row "
                "scales that ComfyUI cannot patch: use the EasyAnimate LoRA node before 'EasyAnimate To ComfyUI "
                "Model', or load the model with memory_mode offload/gpu/block_swap")
        return super().load(device_to, lowvram_model_memory=0, force_patch_weights=force_patch_weights,
                            full_load=True, **kwargs)

    def pre_run(self):
        set_loras(self.model.transformer, list(self.model_options.get(LORAS_OPTION, ())))
        return super().pre_run()


def build_base_model(transformer: nn.Module, kind: str, scheduler_config: dict, scaling_factor: float,
                     rgb_factors=None, rgb_bias=None) -> EasyAnimateBaseModel:
    config = EasyAnimateV5Config(dict(EasyAnimateV5Config.unet_config))
    config.sampling_settings = sampling_settings(scheduler_config)
    config.latent_format = EasyAnimateLatentFormat(scaling_factor, rgb_factors, rgb_bias)
    return EasyAnimateBaseModel(config, transformer, kind, scheduler_config)


def unload_patcher(patcher) -> None:
    """Take a patcher (or a clone of it) out of ComfyUI's loaded models, moving its weights off the device."""
    for i, loaded in enumerate(mm.current_loaded_models):
        if loaded.model is patcher or (loaded.model is not None and loaded.model.is_clone(patcher)):
            mm.current_loaded_models.pop(i).model_unload()
            return
