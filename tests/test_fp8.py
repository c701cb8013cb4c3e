"""fp8 weight storage of the transformer (easyanimate_core/fp8.py), on the CPU.

Tolerances, and why (fp8 e4m3 keeps 3 mantissa bits: a weight rounds by up to 2^-4 of itself):
- quantisation round trip, per element: |q*s - w| <= 2^-4 |w| + 2^-10 s (half an ulp, normal or subnormal);
- one forward of a tiny model with the real proportions, fp8 storage vs float32 weights (float32 or
  bf16 compute), and with a LoRA fp8 vs bf16 weights: relative L2 <= 5e-2 and max |diff| <= 8 % of
  max |output| (measured 2.4e-2 / 2.6e-2, and with LoRA 3.0e-2 / 4.2e-2; bf16 weights alone give about 1e-2);
- golden cases (float32 compute, so only the storage differs), final latents vs the original's:
  relative L2 <= 4e-2, max |diff| <= 5 % of max |latent| (measured rel L2 1.2e-2 / 1.7e-2, max 1.7 % / 2.4 %,
  where bf16 weights give 0.4 % / 0.7 %); with bf16 compute, the fp8 model's error is at most twice the
  plain bf16 pipeline's (measured 1.5x on case a; bf16 compute alone is 2.9 % of max |latent| there);
- LoRA on fp8 with float32 compute vs float32 dequantised weights + the same LoRA merged: 1e-4 (exact math).
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from tiny_lora import linear_names, make_factors, write_lora
from tiny_model import transformer_config
from torch import nn

from conftest import golden_path
from easyanimate_core import UnsupportedRequestError, fp8, load_pipeline, lora
from easyanimate_core.fp8 import FP8_MAX, Fp8Linear, quantize_to_fp8, quantize_weight, weight_bytes
from easyanimate_core.lora import remove_loras, set_loras
from easyanimate_core.models.transformer import EasyAnimateTransformer3D, TransformerConfig

GEN = dict(num_inference_steps=2, height=64, width=64, num_frames=5, seed=7)
HIGH_PRECISION = ("time_embedding.linear_1", "time_embedding.linear_2", "text_proj", "text_proj_t5",
                  "norm_out.linear", "proj_out")


def proportional_config() -> dict:
    """A small config whose block Linears hold ~98 % of the weights, as in the real 12B (99.6 %)."""
    cfg = transformer_config("t2v", num_layers=4, mmdit_layers=4)
    cfg.update(num_attention_heads=8, attention_head_dim=32, time_embed_dim=48, text_embed_dim=64,
               text_embed_dim_t5=128)
    return cfg


@pytest.fixture(scope="module")
def base():
    """float32 random weights with unit-gain fan-in scaling, so every block matters (as tiny_model.py does)."""
    torch.manual_seed(0)
    model = EasyAnimateTransformer3D.from_config_dict(proportional_config())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape) / p[0].numel() ** 0.5)
            elif name.endswith("weight"):  # norms
                p.copy_(1 + 0.1 * torch.randn(p.shape))
            else:
                p.copy_(0.02 * torch.randn(p.shape))
    return model.eval()


def inputs(seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 16, 2, 8, 8, generator=g).to(dtype), torch.tensor([700.0, 300.0]),
            torch.randn(2, 5, 64, generator=g).to(dtype), torch.randn(2, 7, 128, generator=g).to(dtype))


def forward(model, dtype=torch.float32):
    with torch.inference_mode():
        return model(*inputs(dtype=dtype)).float()


def rel_l2(a, b):
    return ((a - b).norm() / b.norm()).item()


def block_linear_fraction(model) -> float:
    total = sum(p.numel() for p in model.parameters())
    blocks = sum(p.numel() for n, m in model.named_modules() if isinstance(m, nn.Linear)
                 and n.startswith("transformer_blocks.") for p in m.parameters())
    return blocks / total


# --- storage ---------------------------------------------------------------------------------------------------

def test_storage_is_about_half_of_bf16(base):
    assert block_linear_fraction(base) > 0.98
    bf16 = copy.deepcopy(base).to(torch.bfloat16)
    quantised = quantize_to_fp8(copy.deepcopy(base), torch.bfloat16)
    ratio = weight_bytes(quantised) / weight_bytes(bf16)
    print(f"tiny proportional model: fp8 {weight_bytes(quantised):,} B / bf16 {weight_bytes(bf16):,} B = {ratio:.4f}")
    assert ratio <= 0.55
    assert sum(isinstance(m, Fp8Linear) for m in quantised.modules()) == len(
        [n for n in linear_names(base) if n.startswith("transformer_blocks.")])


def test_full_size_ratio_from_shapes_on_meta():
    """The real 12B config: counted from shapes on the meta device, nothing allocated."""
    with torch.device("meta"):
        model = EasyAnimateTransformer3D(TransformerConfig()).to(torch.bfloat16)
    assert block_linear_fraction(model) > 0.98
    bf16 = weight_bytes(model)
    quantize_to_fp8(model, torch.bfloat16)
    ratio = weight_bytes(model) / bf16
    print(f"12B: bf16 {bf16 / 1e9:.2f} GB, fp8 {weight_bytes(model) / 1e9:.2f} GB, ratio {ratio:.4f}")
    assert all(t.is_meta for t in model.state_dict().values())
    assert 0.49 < ratio < 0.51  # measured 0.5016


def test_what_stays_high_precision(base):
    model = quantize_to_fp8(copy.deepcopy(base), torch.bfloat16)
    assert model.compute_dtype == torch.bfloat16  # proj stays in the compute dtype: transformer.py needs no change
    assert model.proj.weight.dtype == torch.bfloat16
    for name in HIGH_PRECISION:
        layer = model.get_submodule(name)
        assert type(layer) is nn.Linear and layer.weight.dtype == torch.bfloat16, name
    for name, m in model.named_modules():
        if isinstance(m, Fp8Linear):
            assert name.startswith("transformer_blocks.")
            assert m.weight.dtype == torch.float8_e4m3fn and m.weight_scale.dtype == torch.float32
            assert m.bias.dtype == torch.bfloat16
    norm = model.transformer_blocks[0].norm1.norm
    assert norm.weight.dtype == torch.bfloat16  # LayerNorms are cast, not quantised
    assert quantize_to_fp8(copy.deepcopy(base), torch.float32).compute_dtype == torch.float32
    assert quantize_to_fp8(copy.deepcopy(base), torch.float16).compute_dtype == torch.float16


def test_state_dict_keys_and_round_trip(base):
    model = quantize_to_fp8(copy.deepcopy(base), torch.float32)
    keys = set(model.state_dict())
    scales = {k for k in keys if k.endswith(".weight_scale")}
    assert keys - scales == set(base.state_dict())  # weight/bias names unchanged, scales are the only extra
    assert len(scales) == sum(isinstance(m, Fp8Linear) for m in model.modules())

    with torch.device("meta"):
        empty = quantize_to_fp8(EasyAnimateTransformer3D.from_config_dict(proportional_config()), torch.float32)
    empty.load_state_dict(model.state_dict(), strict=True, assign=True)
    assert torch.equal(forward(empty), forward(model))


# --- numerics --------------------------------------------------------------------------------------------------

def test_per_channel_scale_avoids_clipping_and_flushing():
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(64, 256, generator=g) * 1e-3
    weight[5] *= 1e5  # one row 100000x larger than the rest
    weight[9] = 0.0   # an all-zero row
    q, scale = quantize_weight(weight)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (64,)
    back = q.float() * scale[:, None]
    bound = 2 ** -4 * weight.abs() + 2 ** -10 * scale[:, None]
    assert (back - weight).abs().le(bound * (1 + 1e-6)).all()
    assert back.isfinite().all() and torch.equal(back[9], torch.zeros(256))
    assert q.float().abs().amax(dim=1)[torch.arange(64) != 9].eq(FP8_MAX).all()  # each row uses the full range
    for row in (0, 5, 63):
        assert rel_l2(back[row], weight[row]) < 0.04
    # A single per-tensor scale would flush the small rows (they fall below the float8 range):
    s = weight.abs().max() / FP8_MAX
    per_tensor = (weight / s).to(torch.float8_e4m3fn).float() * s
    assert rel_l2(per_tensor[0], weight[0]) > 0.2


def test_fp8_linear_matches_dequantised_weights():
    torch.manual_seed(3)
    linear = nn.Linear(96, 40)
    layer = Fp8Linear.from_linear(linear, torch.float32)
    x = torch.randn(3, 7, 96)
    expected = F.linear(x, layer.weight.float() * layer.weight_scale[:, None], layer.bias)
    out = layer(x)
    assert torch.allclose(out, expected, atol=1e-6)
    assert rel_l2(out, linear(x)) < 0.04
    assert isinstance(layer, nn.Linear) and out.data_ptr() != x.data_ptr()
    weight_before = layer.weight.view(torch.uint8).clone()
    layer(x.bfloat16())  # bf16 input: computes in bf16 and leaves the stored weight alone
    assert layer(x.bfloat16()).dtype == torch.bfloat16
    assert torch.equal(layer.weight.view(torch.uint8), weight_before)
    no_bias = Fp8Linear.from_linear(nn.Linear(96, 40, bias=False), torch.float32)
    assert no_bias.bias is None and no_bias(x).shape == (3, 7, 40)


def test_float16_compute_keeps_small_scales():
    """Rows with amax 1e-3 have scales near 2e-6, below float16's normal range: rescaling happens in bf16."""
    torch.manual_seed(4)
    layer = Fp8Linear.from_linear(nn.Linear(64, 32), torch.float16)
    with torch.no_grad():
        layer.weight_scale.mul_(1e-3)
    exact = layer.weight.float() * layer.weight_scale[:, None]
    got = layer.dequantized_weight(torch.float16)
    assert got.dtype == torch.float16
    assert rel_l2(got.float(), exact) < 4e-3  # bf16 rounding (2^-9) on top of float16's subnormal steps


def test_forward_close_to_full_precision(base):
    ref = forward(base)
    for compute, tol_rel, tol_max in ((torch.float32, 5e-2, 0.08), (torch.bfloat16, 5e-2, 0.08)):
        model = quantize_to_fp8(copy.deepcopy(base), compute)
        out = forward(model, compute)
        err_max = (out - ref).abs().max().item() / ref.abs().max().item()
        print(f"fp8 storage, {compute} compute vs float32 weights: rel L2 {rel_l2(out, ref):.2e}, "
              f"max |diff| / max |out| {err_max:.2e}")
        assert rel_l2(out, ref) < tol_rel and err_max < tol_max


def test_device_moves_keep_fp8(base):
    model = quantize_to_fp8(copy.deepcopy(base), torch.bfloat16)
    layer = model.transformer_blocks[0].attn1.to_q
    moved = copy.deepcopy(model).to("meta")
    moved_layer = moved.transformer_blocks[0].attn1.to_q
    assert moved_layer.weight.is_meta and moved_layer.weight_scale.is_meta and moved_layer.bias.is_meta
    assert moved_layer.weight.dtype == torch.float8_e4m3fn and moved_layer.weight_scale.dtype == torch.float32
    assert weight_bytes(moved) == weight_bytes(model)
    back = moved.to_empty(device="cpu")  # and back to a real device
    assert back.transformer_blocks[0].attn1.to_q.weight.device.type == "cpu"
    assert layer.weight.device.type == "cpu"


def test_missing_float8_dtype_is_a_clear_error(base, monkeypatch, tiny_model_dir):
    monkeypatch.setattr(fp8, "FP8_DTYPE", None)
    assert not fp8.fp8_available()
    with pytest.raises(UnsupportedRequestError, match="float8_e4m3fn.*PyTorch 2.1"):
        quantize_to_fp8(copy.deepcopy(base), torch.bfloat16)
    with pytest.raises(UnsupportedRequestError, match="without fp8"):
        load_pipeline(tiny_model_dir("t2v"), fp8=True)


# --- LoRA ------------------------------------------------------------------------------------------------------

@pytest.fixture
def lora_file(base, tmp_path):
    lora.clear_cache()
    factors = make_factors(base, linear_names(base), 4, seed=11, alpha=4.0)
    yield write_lora(tmp_path / "style.safetensors", factors), factors
    lora.clear_cache()


def merged(model, factors, strength):
    """A plain float32 copy of `model` (fp8 layers dequantised) with the LoRA merged into its weights."""
    plain = copy.deepcopy(model)
    remove_loras(plain)
    for name, m in list(plain.named_modules()):
        if isinstance(m, Fp8Linear):
            new = nn.Linear(m.in_features, m.out_features)
            with torch.no_grad():
                new.weight.copy_(m.dequantized_weight(torch.float32))
                new.bias.copy_(m.bias.float())
            parent, _, child = name.rpartition(".")
            setattr(plain.get_submodule(parent), child, new)
    plain.float()
    with torch.no_grad():
        for name, (down, up, alpha) in factors.items():
            plain.get_submodule(name).weight += strength * alpha / down.shape[0] * (up @ down)
    return plain


def test_lora_on_fp8_is_exact_with_float32_compute(base, lora_file):
    path, factors = lora_file
    model = quantize_to_fp8(copy.deepcopy(base), torch.float32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.inference_mode():  # as ComfyUI runs nodes
        report = set_loras(model, [(path, 0.8)])
    assert report.targets == len(factors)
    assert model.transformer_blocks[0].attn1.to_q._lora_handle is not None  # hooks sit on the Fp8Linear layers
    out = forward(model)
    expected = forward(merged(model, factors, 0.8))
    effect = (expected - forward(merged(model, factors, 0.0))).abs().max().item()
    assert effect > 0.1
    assert (out - expected).abs().max().item() < 1e-4

    set_loras(model, [])
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k].view(torch.uint8), v.view(torch.uint8)) for k, v in before.items())


def test_lora_on_fp8_matches_bf16_weights_with_lora(base, lora_file):
    path, factors = lora_file
    bf16 = copy.deepcopy(base).to(torch.bfloat16)
    quantised = quantize_to_fp8(copy.deepcopy(base), torch.bfloat16)
    for m in (bf16, quantised):
        set_loras(m, [(path, 1.0)])
    ref, out = forward(bf16, torch.bfloat16), forward(quantised, torch.bfloat16)
    full = forward(merged(base, factors, 1.0))
    print(f"with LoRA: fp8 vs bf16 weights rel L2 {rel_l2(out, ref):.2e}; fp8 vs float32 {rel_l2(out, full):.2e}, "
          f"bf16 vs float32 {rel_l2(ref, full):.2e}")
    print(f"with LoRA: fp8 vs bf16 weights max |diff| / max |out| {(out - ref).abs().max() / ref.abs().max():.2e}")
    assert rel_l2(out, ref) < 5e-2
    assert (out - ref).abs().max().item() < 0.08 * ref.abs().max().item()


def test_lora_set_before_quantising_moves_along(base, lora_file):
    path, factors = lora_file
    model = copy.deepcopy(base)
    set_loras(model, [(path, 0.5)])
    quantize_to_fp8(model, torch.float32)
    layer = model.transformer_blocks[1].ff.net[2]
    assert isinstance(layer, Fp8Linear) and layer._lora_handle is not None
    assert (forward(model) - forward(merged(model, factors, 0.5))).abs().max().item() < 1e-4
    remove_loras(model)
    assert not any(".lora_" in n for n, _ in model.named_buffers())


# --- loading ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_load_pipeline_fp8_from_a_model_folder(tiny_model_dir, tiny_pipeline, dtype):
    pipe = load_pipeline(tiny_model_dir("t2v"), dtype=dtype, fp8=True)
    plain = tiny_pipeline("t2v")  # float32 weights
    transformer = pipe.transformer
    assert pipe.dtype == dtype and transformer.compute_dtype == dtype
    assert not any(t.is_meta for t in transformer.state_dict().values())
    assert not any(p.requires_grad for p in transformer.parameters())
    # Quantised while reading, from the file's float32 values: the same bits as quantising the loaded model.
    expected = quantize_to_fp8(copy.deepcopy(plain.transformer), dtype).state_dict()
    got = transformer.state_dict()
    assert got.keys() == expected.keys()
    for k, v in expected.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k].view(torch.uint8), v.view(torch.uint8)), k
    assert sum(isinstance(m, Fp8Linear) for m in transformer.modules()) > 0
    assert weight_bytes(transformer) < 0.7 * weight_bytes(copy.deepcopy(plain.transformer).to(dtype))

    out = pipe.generate("a cat playing guitar", **GEN)
    ref = plain.generate("a cat playing guitar", **GEN)
    assert out.frames.shape == ref.frames.shape and out.latents.isfinite().all()
    print(f"tiny pipeline, fp8 ({dtype}) vs float32: latents rel L2 {rel_l2(out.latents.float(), ref.latents):.2e}")
    assert rel_l2(out.latents.float(), ref.latents) < 0.1


# --- golden cases ----------------------------------------------------------------------------------------------

def golden_run(name, dtype, fp8_storage, bf16_weights=False):
    from test_golden_cases import case_call

    case_dir = golden_path("cases", name)
    case, kwargs, _ = case_call(case_dir)
    pipe = load_pipeline(golden_path(*case["reference"]["model_dir"].split("/")), dtype=dtype, fp8=fp8_storage)
    if bf16_weights:  # float32 compute over bf16-rounded weights: only the storage differs from fp8
        with torch.no_grad():
            for p in pipe.transformer.parameters():
                p.copy_(p.bfloat16().float())
    want = load_file(case_dir / "final_latents.safetensors")["final_latents"]
    return pipe.generate(**kwargs).latents.float(), want


@pytest.mark.parametrize("name", ["a_t2v_64x112_f5_ddim", "i_control_64x112_f9"])
def test_golden_case_with_fp8_storage(name):
    fp8_out, want = golden_run(name, torch.float32, True)
    bf16w_out, _ = golden_run(name, torch.float32, False, bf16_weights=True)
    scale = want.abs().max().item()
    for label, out in (("vs the original (float32)", want), ("vs bf16 weights", bf16w_out)):
        err = (fp8_out - out).abs().max().item()
        print(f"{name}: fp8 storage {label}: max |diff| {err:.3e} ({err / scale:.1%} of max |latent|), "
              f"rel L2 {rel_l2(fp8_out, out):.2e}")
        assert err <= 0.05 * scale and rel_l2(fp8_out, out) <= 4e-2
    print(f"{name}: bf16 weights vs the original: max |diff| {(bf16w_out - want).abs().max().item():.3e}")


def test_golden_case_fp8_with_bf16_compute():
    """The GPU setting: fp8 storage, bf16 activations. fp8 at most doubles the error of plain bf16."""
    name = "a_t2v_64x112_f5_ddim"
    fp8_out, want = golden_run(name, torch.bfloat16, True)
    bf16_out, _ = golden_run(name, torch.bfloat16, False)
    err_fp8, err_bf16 = ((o - want).abs().max().item() for o in (fp8_out, bf16_out))
    print(f"{name}: bf16 compute, max |diff| vs the original: fp8 weights {err_fp8:.3e}, bf16 weights {err_bf16:.3e}, "
          f"fp8 vs bf16 {(fp8_out - bf16_out).abs().max().item():.3e}")
    assert err_fp8 <= 2 * err_bf16
