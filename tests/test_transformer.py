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


# --- fast eager path, RoPE cache, compile -------------------------------------------------------


def random_tiny(num_layers=3, mmdit_layers=2, heads=2):
    from tiny_model import transformer_config

    config = transformer_config("t2v", num_layers=num_layers, mmdit_layers=mmdit_layers)
    config["num_attention_heads"] = heads
    torch.manual_seed(0)
    net = EasyAnimateTransformer3D.from_config_dict(config)
    with torch.no_grad():
        for p in net.parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape) / p[0].numel() ** 0.5)
    return net.eval()


def tiny_inputs(seed=1, width=8):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 16, 2, 8, width, generator=g), torch.tensor([700.0, 300.0]),
            torch.randn(2, 5, 32, generator=g), torch.randn(2, 7, 48, generator=g))


def test_fast_inference_path_matches_plain_formulas():
    """Inference (in-place modulate, joint q/k/v filled in place, complex RoPE, oneDNN linear+GELU) against
    the plain formulas that run under autograd and torch.compile."""
    net = random_tiny(heads=4)
    with torch.inference_mode():
        fast = net(*tiny_inputs())
    with torch.enable_grad():
        plain = net(*tiny_inputs()).detach()
    assert (fast - plain).abs().max().item() < 1e-5


def test_complex_rope_into_matches_apply_rope():
    from easyanimate_core.models.rope import apply_rope, apply_rope_into, rope_tables

    cos, sin = build_3d_rope(3, 4, 7, 64)
    rope = rope_tables(cos, sin)
    x = torch.randn(2, 84, 8, 64)
    expected = apply_rope(x, cos, sin)
    joint = torch.zeros(2, 8, 90, 64).transpose(1, 2)  # [B, L, heads, d] view of [B, heads, L, d] memory
    apply_rope_into(joint[:, 6:], x, rope)
    assert torch.equal(joint[:, 6:], expected)  # same products and sums: bit-identical in float32
    assert torch.equal(joint[:, :6], torch.zeros(2, 6, 8, 64))
    out = torch.empty(2, 84, 8, 64, dtype=torch.bfloat16)
    apply_rope_into(out, x.bfloat16(), rope)
    torch.testing.assert_close(out, apply_rope(x.bfloat16(), cos, sin), atol=0, rtol=0.01)
    no_complex = rope._replace(rotation=None)  # devices without complex support use the real formula
    apply_rope_into(joint[:, 6:], x, no_complex)
    assert torch.equal(joint[:, 6:], expected)


def test_rope_tables_built_once_per_geometry(monkeypatch):
    import easyanimate_core.models.transformer as transformer_module

    builds = []
    real = transformer_module.build_3d_rope
    monkeypatch.setattr(transformer_module, "build_3d_rope", lambda *a, **k: builds.append(a) or real(*a, **k))
    net = random_tiny()
    with torch.inference_mode():
        for _ in range(3):
            net(*tiny_inputs())
        net(*tiny_inputs(width=16))
    assert builds == [(2, 4, 4, 16), (2, 4, 8, 16)]
    tables = net.rope(2, 4, 4, torch.device("cpu"))
    assert tables is net.rope(2, 4, 4, "cpu") and len(builds) == 2
    with torch.inference_mode():  # the cached tables, or their cos/sin, passed in give the same output
        own = net(*tiny_inputs())
        assert torch.equal(net(*tiny_inputs(), image_rotary_emb=tables), own)
        assert torch.equal(net(*tiny_inputs(), image_rotary_emb=tables[:2]), own)


def test_forward_on_meta_device_needs_no_tensor_values():
    """Every shape decision comes from shapes, none from tensor values: no .item() or other host read
    (which would also be a device sync on a GPU) anywhere in the forward."""
    with torch.device("meta"):
        net = EasyAnimateTransformer3D(TransformerConfig(
            num_attention_heads=2, attention_head_dim=16, num_layers=2, mmdit_layers=1, time_embed_dim=32,
            text_embed_dim=32, text_embed_dim_t5=48))
        args = (torch.empty(2, 16, 3, 8, 12), torch.empty(2), torch.empty(2, 5, 32), torch.empty(2, 7, 48))
    with torch.inference_mode():
        assert net(*args).shape == (2, 16, 3, 8, 12)


def test_hooked_linear_output_is_not_overwritten():
    """A forward hook that keeps a Linear's output sees it unchanged (no in-place GELU or modulation on it),
    unless the hook declares itself inplace_safe."""
    net = random_tiny()
    proj = net.transformer_blocks[0].ff.net[0].proj
    kept = []

    def keep(module, args, out):
        kept.append((args[0].clone(), out))

    proj.register_forward_hook(keep)
    with torch.inference_mode():
        net(*tiny_inputs())
        x, out = kept[0]
        torch.testing.assert_close(out, torch.nn.functional.linear(x, proj.weight, proj.bias), rtol=0, atol=1e-6)
        keep.inplace_safe = True
        kept.clear()
        net(*tiny_inputs())
        x, out = kept[0]
        expected = torch.nn.functional.gelu(torch.nn.functional.linear(x, proj.weight, proj.bias), approximate="tanh")
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


def test_compiled_blocks_match_eager_and_follow_loras(tmp_path):
    """compile_transformer_blocks on a 2-block model: same output as eager (1e-5), and a LoRA set, changed
    or removed after compiling takes effect (hook guards recompile; strengths are tensors, no recompile)."""
    import copy
    import time

    from tiny_lora import write_tiny_lora

    from easyanimate_core.lora import set_loras
    from easyanimate_core.models.transformer import compile_transformer_blocks

    eager = random_tiny(num_layers=2, mmdit_layers=2)
    compiled = copy.deepcopy(eager)
    compile_transformer_blocks(compiled)
    assert compiled.state_dict().keys() == eager.state_dict().keys()
    path = write_tiny_lora(tmp_path / "a.safetensors", eager)
    start = time.perf_counter()
    with torch.inference_mode():
        base = eager(*tiny_inputs())
        assert (compiled(*tiny_inputs()) - base).abs().max().item() < 1e-5
        for strength in (0.8, -0.5):
            set_loras(eager, [(path, strength)])
            set_loras(compiled, [(path, strength)])
            expected = eager(*tiny_inputs())
            assert (expected - base).abs().max().item() > 0.1
            assert (compiled(*tiny_inputs()) - expected).abs().max().item() < 1e-5, strength
        set_loras(compiled, [])
        assert (compiled(*tiny_inputs()) - base).abs().max().item() < 1e-5
    print(f"\ncompiling and running took {time.perf_counter() - start:.1f} s")
