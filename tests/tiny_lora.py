"""Small LoRA files in the kohya and diffusers/peft layouts, written with real safetensors."""
import torch
from safetensors.torch import save_file
from torch import nn


def linear_names(model):
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def make_factors(model, names, rank, seed, alpha=None):
    """{layer: (down [r, in], up [out, r], alpha)} with an effect of the order of the weights."""
    g = torch.Generator().manual_seed(seed)
    factors = {}
    for name in names:
        out_f, in_f = model.get_submodule(name).weight.shape
        down = torch.randn(rank, in_f, generator=g) / in_f ** 0.5
        up = torch.randn(out_f, rank, generator=g) / rank ** 0.5 * 0.5
        factors[name] = (down, up, alpha)
    return factors


def write_lora(path, factors, layout="kohya"):
    """Write factors as a real safetensors LoRA in one of the layouts the loader accepts."""
    state = {}
    for name, (down, up, alpha) in factors.items():
        if layout.startswith("kohya"):
            stem = ("lora_unet__" if layout == "kohya__" else "lora_unet_") + name.replace(".", "_")
            keys = (f"{stem}.lora_down.weight", f"{stem}.lora_up.weight")
        else:
            stem = ("transformer." if layout == "peft" else "") + name
            keys = (f"{stem}.lora_A.weight", f"{stem}.lora_B.weight")
        state[keys[0]], state[keys[1]] = down.contiguous(), up.contiguous()
        if alpha is not None:
            state[f"{stem}.alpha"] = torch.tensor(float(alpha))
    save_file(state, str(path))
    return path


def write_tiny_lora(path, transformer, rank=4, seed=0, alpha=2.0, layout="kohya"):
    """A LoRA on every Linear of `transformer`."""
    return write_lora(path, make_factors(transformer, linear_names(transformer), rank, seed, alpha), layout)
