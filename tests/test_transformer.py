"""Transformer and 3D RoPE against the goldens of the original V5 code (tiny models, float32, CPU)."""
import json

import pytest
import torch
from conftest import golden_path
from safetensors.torch import load_file

from easyanimate_core import load_transformer
from easyanimate_core.loading import validate_model_dir
from easyanimate_core.models.rope import build_3d_rope, resize_crop_region
from easyanimate_core.models.transformer import EasyAnimateTransformer3D, TransformerConfig

ATOL = 1e-4
VARIANTS = [
    "EasyAnimateV5-tiny-zh__64x112_T2_B2",
    "EasyAnimateV5-tiny-zh__112x64_T3_B1",
    "EasyAnimateV5-tiny-zh-3layer__64x112_T2_B2",
    "EasyAnimateV5-tiny-zh-InP__64x112_T2_B2",
    "EasyAnimateV5-tiny-zh-Control__64x112_T2_B2",
]
TINY_MODELS = sorted({v.split("__")[0] for v in VARIANTS})


def load_tiny(model: str) -> EasyAnimateTransformer3D:
    """The golden tiny transformer through the real loader (meta build + streamed weights)."""
    return load_transformer(validate_model_dir(golden_path("models", model)), dtype=torch.float32)


def call(net, inputs, rope=True):
    return net(
        inputs["hidden_states"],
        inputs["timestep"],
        inputs["encoder_hidden_states"],
        inputs["encoder_hidden_states_t5"],
        inpaint_latents=inputs.get("inpaint_latents"),
        control_latents=inputs.get("control_latents"),
        image_rotary_emb=(inputs["rope_cos"], inputs["rope_sin"]) if rope else None,
    )


def record_intermediates(net) -> dict:
    """Forward hooks that store our tensors under the golden intermediate names."""
    rec = {}

    def hook(*names):
        return lambda module, args, out: rec.update(zip(names, out if isinstance(out, tuple) else (out,)))

    net.time_embedding.register_forward_hook(lambda m, args, out: rec.update(time_proj=args[0], temb=out))
    net.proj.register_forward_hook(hook("patch_embed_conv"))
    net.text_proj.register_forward_hook(hook("text_proj"))
    net.text_proj_t5.register_forward_hook(hook("text_proj_t5"))
    for i, block in enumerate(net.transformer_blocks):
        block.register_forward_hook(hook(f"block{i}_hidden", f"block{i}_encoder_hidden"))
    net.norm_out.register_forward_hook(hook("norm_out_out"))
    net.proj_out.register_forward_hook(hook("proj_out_out"))
    return rec


@pytest.mark.parametrize("variant", VARIANTS)
def test_component_golden(variant):
    folder = golden_path("components", "transformer", variant)
    inputs = load_file(folder / "inputs.safetensors")
    expected = load_file(folder / "output.safetensors")["output"]
    golden_mid = load_file(folder / "intermediates.safetensors")

    net = load_tiny(variant.split("__")[0])
    rec = record_intermediates(net)
    with torch.no_grad():
        out = call(net, inputs)
        out_own_rope = call(net, inputs, rope=False)

    errors = {name: (rec[name] - golden_mid[name]).abs().max().item() for name in rec}
    errors["output"] = (out - expected).abs().max().item()
    print(f"\n{variant}: worst |diff| output {errors['output']:.2e}, intermediates {max(errors.values()):.2e}")
    assert set(rec) == set(golden_mid) - {"norm_final_out"}
    for name, err in errors.items():
        assert err < ATOL, f"{variant}: {name} differs by {err:.3e}"
    assert out.shape == expected.shape and out.dtype == torch.float32
    # image_rotary_emb=None builds the same tables itself.
    assert torch.equal(out, out_own_rope)


def test_tiny_bf16_close_to_fp32():
    folder = golden_path("components", "transformer", "EasyAnimateV5-tiny-zh-3layer__64x112_T2_B2")
    inputs = load_file(folder / "inputs.safetensors")
    expected = load_file(folder / "output.safetensors")["output"]
    net = load_tiny("EasyAnimateV5-tiny-zh-3layer").to(torch.bfloat16)
    with torch.no_grad():
        out = call(net, inputs, rope=False)
    assert out.dtype == torch.bfloat16
    rel = (out.float() - expected).norm() / expected.norm()
    assert rel < 3e-2, rel


# --- RoPE -------------------------------------------------------------------------------------


def test_rope_crop_regions():
    index = json.loads(golden_path("components", "rope", "index.json").read_text())
    for resolution, entry in index["crops_full_size_examples"].items():
        crops = resize_crop_region(*entry["grid"])
        assert [list(c) for c in crops] == entry["crops"], resolution


def test_rope_head_dim_64_table():
    table = load_file(golden_path("components", "rope", "rope_hd64_384x672_T2.safetensors"))
    cos, sin = build_3d_rope(2, 384 // 16, 672 // 16, 64)
    assert cos.dtype == sin.dtype == torch.float32
    torch.testing.assert_close(cos, table["cos"], atol=1e-6, rtol=0)
    torch.testing.assert_close(sin, table["sin"], atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "case, frames, grid",
    [
        ("a_t2v_64x112_f5_ddim", 2, (4, 7)),
        ("b1_t2v_112x64_f9_ddim", 3, (7, 4)),
        ("g_inp_v2v_64x112_f9_s0.7", 3, (4, 7)),
    ],
)
def test_rope_tiny_case_tables(case, frames, grid):
    trace = load_file(golden_path("cases", case, "trace.safetensors"))
    cos, sin = build_3d_rope(frames, *grid, 16)
    torch.testing.assert_close(cos, trace["rope_cos"], atol=1e-6, rtol=0)
    torch.testing.assert_close(sin, trace["rope_sin"], atol=1e-6, rtol=0)


# --- state-dict layout --------------------------------------------------------------------------


def meta_shapes(config: dict) -> tuple[EasyAnimateTransformer3D, dict]:
    with torch.device("meta"):
        net = EasyAnimateTransformer3D.from_config_dict(config)
    return net, {name: list(t.shape) for name, t in net.state_dict().items()}


@pytest.mark.parametrize("manifest", ["transformer_v5_12b", "transformer_v5_7b_guess"])
def test_full_size_state_dict_layout(manifest):
    data = json.loads(golden_path("manifests", f"{manifest}.json").read_text())
    net, shapes = meta_shapes(data["config"])
    assert shapes == data["param_shapes"]
    assert sum(p.numel() for p in net.parameters()) == data["n_params"]
    assert not list(net.buffers())


@pytest.mark.parametrize("model", TINY_MODELS)
def test_tiny_state_dict_layout(model):
    data = json.loads(golden_path("manifests", f"tiny__{model}__transformer.json").read_text())
    config = json.loads(golden_path("models", model, "transformer", "config.json").read_text())
    assert meta_shapes(config)[1] == data["param_shapes"]


def test_config_overrides_and_unknown_keys():
    cfg = TransformerConfig.from_dict(
        {"enable_text_attention_mask": True, "resize_inpaint_mask_directly": False, "upcast_attention": True}
    )
    assert cfg.enable_text_attention_mask is False
    assert cfg.resize_inpaint_mask_directly is True
    assert cfg.enable_clip_in_inpaint is False
    with pytest.raises(ValueError):
        TransformerConfig.from_dict({"after_norm": True})
