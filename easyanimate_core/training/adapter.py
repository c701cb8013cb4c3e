"""Trainable LoRA factors on the transformer's Linear layers, named as the original's kohya LoRANetwork.

The factors are fp32 nn.Parameters owned by the adapter (never registered on the transformer, so the
model's state_dict, its weights and ComfyUI's bookkeeping are unchanged); forward hooks add
`up(down(x)) * alpha / rank` to each targeted Linear's output. `detach()` removes every hook: the
model is then exactly as before.

Original naming: `lora_unet_` + "_" (the matched root module's empty name) + the layer's dotted name
with "." -> "_", e.g. `lora_unet__transformer_blocks_0_attn1_to_q`; keys `<name>.lora_down.weight`
[rank, in], `<name>.lora_up.weight` [out, rank] and `<name>.alpha` (0-dim).
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import CheckpointError, UnsupportedRequestError

KOHYA_PREFIX = "lora_unet__"
ATTENTION_LAYERS = ("to_q", "to_k", "to_v", "to_out.0")
TARGET_SETS = ("all", "attention")


def target_filter(targets: str) -> Callable[[str], bool]:
    """Which Linear names get a LoRA: "all" (every Linear, as the original) or "attention" (q, k, v, out)."""
    if targets == "all":
        return lambda name: True
    if targets == "attention":
        return lambda name: ".attn" in f".{name}" and name.endswith(ATTENTION_LAYERS)
    raise UnsupportedRequestError(f"unknown LoRA targets {targets!r}; choose one of {', '.join(TARGET_SETS)}")


def kohya_name(layer: str) -> str:
    return KOHYA_PREFIX + layer.replace(".", "_")


class LoraAdapter(nn.Module):
    """LoRA factors for the selected Linears of `transformer` (fp32 parameters, on the model's device)."""

    def __init__(self, transformer: nn.Module, rank: int, alpha: float, targets: str = "all",
                 generator: torch.Generator | None = None):
        super().__init__()
        if rank < 1:
            raise UnsupportedRequestError(f"LoRA rank must be at least 1, got {rank}")
        include = target_filter(targets)
        layers = {name: m for name, m in transformer.named_modules()
                  if isinstance(m, nn.Linear) and include(name)}
        if not layers:
            raise UnsupportedRequestError(f"no Linear layer of this transformer matches LoRA targets {targets!r}")
        too_small = [f"{n} ({m.in_features}->{m.out_features})" for n, m in layers.items()
                     if rank > min(m.in_features, m.out_features)]
        if too_small:
            smallest = min(min(m.in_features, m.out_features) for m in layers.values())
            raise UnsupportedRequestError(
                f"LoRA rank {rank} is larger than {len(too_small)} target layers, e.g. {too_small[0]}: a rank above a "
                f"layer's smaller side adds parameters without adding capacity. Use rank <= {smallest} for this model.")
        self.rank, self.alpha, self.targets = int(rank), float(alpha), targets
        self.scale = self.alpha / self.rank
        self.layer_names = list(layers)
        self.down = nn.ParameterDict()
        self.up = nn.ParameterDict()
        for name, m in layers.items():
            device = m.weight.device
            down = torch.empty(rank, m.in_features)
            # kaiming_uniform_(a=sqrt(5)) as nn.Linear / the original LoRAModule, from our seeded generator
            bound = 1.0 / math.sqrt(m.in_features)
            down.uniform_(-bound, bound, generator=generator)
            key = self._key(name)
            self.down[key] = nn.Parameter(down.to(device))
            self.up[key] = nn.Parameter(torch.zeros(m.out_features, rank, device=device))
        self._layers = layers
        self._handles: list = []

    @staticmethod
    def _key(name: str) -> str:
        return name.replace(".", "__")  # ParameterDict keys may not contain "."

    # ------------------------------------------------------------------ hooks
    def attach(self) -> None:
        """Hook every target Linear (idempotent)."""
        if self._handles:
            return
        for name, module in self._layers.items():
            self._handles.append(module.register_forward_hook(self._hook(self._key(name))))

    def detach(self) -> None:
        """Remove every hook: the transformer computes exactly as before."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, key: str):
        def hook(module, args, output):
            down, up = self.down[key], self.up[key]
            x = args[0]
            low = F.linear(x.to(down.dtype), down)
            return output + (F.linear(low, up) * self.scale).to(output.dtype)
        return hook

    # ------------------------------------------------------------------ state
    def state_dict_kohya(self, dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
        """{original key: tensor} (CPU, `dtype`), alpha included, as the original's save_weights writes."""
        out = {}
        for name in self.layer_names:
            key, stem = self._key(name), kohya_name(name)
            out[f"{stem}.lora_down.weight"] = self.down[key].detach().to("cpu", dtype).contiguous()
            out[f"{stem}.lora_up.weight"] = self.up[key].detach().to("cpu", dtype).contiguous()
            out[f"{stem}.alpha"] = torch.tensor(self.alpha, dtype=dtype)
        return out

    @torch.no_grad()
    def load_kohya(self, state: dict[str, Tensor], where: str = "initial LoRA") -> None:
        """Copy factors from {original key: tensor}; every target must be present with the right shapes."""
        for name in self.layer_names:
            key, stem = self._key(name), kohya_name(name)
            for part, params in (("lora_down", self.down), ("lora_up", self.up)):
                k = f"{stem}.{part}.weight"
                if k not in state:
                    raise CheckpointError(f"{where} has no {k}: it was trained with other targets or for another "
                                          "model; start without it or use matching settings")
                if tuple(state[k].shape) != tuple(params[key].shape):
                    raise CheckpointError(f"{where}: {k} has shape {list(state[k].shape)}, expected "
                                          f"{list(params[key].shape)} (rank {self.rank}); use the rank it was "
                                          "trained with")
                params[key].copy_(state[k].to(params[key]))
            alpha_key = f"{stem}.alpha"
            if alpha_key in state and float(state[alpha_key]) != self.alpha:
                raise CheckpointError(f"{where} was trained with alpha {float(state[alpha_key]):g}, not "
                                      f"{self.alpha:g}; use the same alpha to continue it")
