"""ComfyUI's LoRA loaders on our MODEL: the key map from EasyAnimate LoRA names to our weights.

ComfyUI maps a LoRA file's layer names to model weights in `comfy.lora.model_lora_keys_unet`, with a
branch per model family. EasyAnimate is not one of its families, so that function is wrapped once to
add, for a model of ours, every Linear of the transformer under the names EasyAnimate LoRAs use:
kohya (`lora_unet_<module_path_with_underscores>`, also with the double underscore some trainers
write) and diffusers/peft (`transformer.<module.path>`, and the bare path).
"""
from __future__ import annotations

from torch import nn

import comfy.lora

PREFIX = "diffusion_model.transformer."


def easyanimate_lora_keys(transformer: nn.Module) -> dict[str, str]:
    """{LoRA layer name: model state-dict key} for every Linear of the transformer."""
    keys = {}
    for name, module in transformer.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        target = f"{PREFIX}{name}.weight"
        flat = name.replace(".", "_")
        keys[f"lora_unet_{flat}"] = target
        keys[f"lora_unet__{flat}"] = target
        keys[f"transformer.{name}"] = target
        keys[name] = target
    return keys


def install() -> None:
    """Wrap comfy.lora.model_lora_keys_unet (once) so that it knows our model's layer names."""
    original = comfy.lora.model_lora_keys_unet
    if getattr(original, "easyanimate_wrapped", False):
        return

    def model_lora_keys_unet(model, key_map={}):
        key_map = original(model, key_map)
        transformer = getattr(model, "easyanimate_transformer", None)
        if transformer is not None:
            key_map.update(easyanimate_lora_keys(transformer))
        return key_map

    model_lora_keys_unet.easyanimate_wrapped = True
    comfy.lora.model_lora_keys_unet = model_lora_keys_unet
