"""LoRA: both file layouts, stacking, strengths, exact restore, errors, dtype and device moves (CPU, float32)."""
import copy

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tiny_lora import linear_names, make_factors, write_lora
from tiny_model import random_transformer
from torch import nn

from easyanimate_core import lora
from easyanimate_core.errors import CheckpointError, ModelFolderError
from easyanimate_core.lora import remove_loras, set_loras

ATOL = 1e-5
GEN = dict(num_inference_steps=2, height=64, width=64, num_frames=5, seed=7)


@pytest.fixture(scope="module")
def base():
    """A tiny random transformer: 2 MMDiT blocks and 1 shared block, weights scaled so blocks matter."""
    return random_transformer(num_layers=3, mmdit_layers=2)


@pytest.fixture
def model(base):
    return copy.deepcopy(base)


@pytest.fixture(autouse=True)
def fresh_cache():
    lora.clear_cache()
    yield
    lora.clear_cache()


def inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 16, 2, 8, 8, generator=g), torch.tensor([700.0, 300.0]),
            torch.randn(2, 5, 32, generator=g), torch.randn(2, 7, 48, generator=g))


def forward(model, dtype=None):
    x, t, bert, t5 = inputs()
    if dtype is not None:
        x, bert, t5 = x.to(dtype), bert.to(dtype), t5.to(dtype)
    with torch.inference_mode():
        return model(x, t, bert, t5).float()


def hand_merged(model, stack):
    """A deep copy without hooks whose weights got W += strength * alpha / rank * (up @ down) per LoRA."""
    merged = copy.deepcopy(model)
    remove_loras(merged)
    with torch.no_grad():
        for factors, strength in stack:
            for name, (down, up, alpha) in factors.items():
                scale = strength * (alpha / down.shape[0] if alpha is not None else 1.0)
                merged.get_submodule(name).weight += scale * (up @ down)
    return merged


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_bit_identical(model, before):
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        # torch.equal has no float8 kernel on CPU: compare the raw bytes.
        assert torch.equal(after[k].view(torch.uint8), v.view(torch.uint8)), k


def assert_no_lora_left(model):
    for name, m in model.named_modules():
        assert not m._forward_hooks, name
        assert not any(b.startswith("lora_") for b, _ in m.named_buffers(recurse=False)), name


@pytest.mark.parametrize("layout,alpha", [("kohya", 8.0), ("kohya__", 2.0), ("peft", None), ("peft_bare", 4.0)])
def test_layouts_match_hand_merged_weights(model, tmp_path, layout, alpha):
    names = linear_names(model)
    factors = make_factors(model, names, rank=4, seed=3, alpha=alpha)
    path = write_lora(tmp_path / f"{layout}.safetensors", factors, layout)
    base_out = forward(model)

    report = set_loras(model, [(path, 0.8)])

    assert report.targets == len(names) == report.files[0].matched
    assert report.files[0].unmatched_keys == []
    out = forward(model)
    expected = forward(hand_merged(model, [(factors, 0.8)]))
    assert (out - expected).abs().max().item() <= ATOL
    assert (out - base_out).abs().max().item() > 0.1  # the LoRA does something


def test_stack_with_negative_strength_matches_in_generate(tiny_pipeline, tmp_path):
    pipe = tiny_pipeline("t2v")
    model = pipe.transformer
    names = linear_names(model)
    style = make_factors(model, names, rank=4, seed=4, alpha=2.0)
    attention_only = make_factors(model, [n for n in names if ".attn" in n], rank=2, seed=5)
    paths = [write_lora(tmp_path / "style.safetensors", style, "kohya"),
             write_lora(tmp_path / "attn.safetensors", attention_only, "peft")]
    before = snapshot(model)
    plain = pipe.generate("a cat", **GEN)
    try:
        report = set_loras(model, [(paths[0], 0.7), (paths[1], -1.5)])
        assert report.targets == len(names)
        assert [f.matched for f in report.files] == [len(names), len(attention_only)]
        out = pipe.generate("a cat", **GEN)
        pipe.transformer = hand_merged(model, [(style, 0.7), (attention_only, -1.5)])
        expected = pipe.generate("a cat", **GEN)
    finally:
        pipe.transformer = model
        set_loras(model, [])
    assert (out.latents - expected.latents).abs().max().item() <= ATOL
    assert (out.frames - expected.frames).abs().max().item() <= ATOL
    assert (out.latents - plain.latents).abs().max().item() > 0.01
    assert_bit_identical(model, before)
    assert_no_lora_left(model)
    assert torch.equal(pipe.generate("a cat", **GEN).latents, plain.latents)


def test_apply_run_change_remove_restores_bit_for_bit(model, tmp_path):
    names = linear_names(model)
    a = write_lora(tmp_path / "a.safetensors", make_factors(model, names, 4, seed=6, alpha=4.0))
    b = write_lora(tmp_path / "b.safetensors", make_factors(model, names[::2], 8, seed=7), "peft")
    before, base_out = snapshot(model), forward(model)

    set_loras(model, [(a, 1.0)])
    forward(model)
    set_loras(model, [(a, 0.5), (b, -0.3)])  # replaces, does not add to, the first set
    assert sum(1 for m in model.modules() if m._forward_hooks) == len(names)
    forward(model)
    assert_bit_identical(model, before)
    report = set_loras(model, [])

    assert report.targets == 0 and report.summary() == "no LoRA"
    assert_bit_identical(model, before)
    assert_no_lora_left(model)
    assert torch.equal(forward(model), base_out)


def test_exception_mid_sampling_leaves_base_weights(tiny_pipeline, tmp_path):
    pipe = tiny_pipeline("t2v")
    model = pipe.transformer
    path = write_lora(tmp_path / "a.safetensors", make_factors(model, linear_names(model), 4, seed=8, alpha=1.0))
    before = snapshot(model)
    plain = pipe.generate("a dog", **GEN)

    class Interrupted(Exception):
        pass

    def interrupt(info):
        if info.step == 1:
            raise Interrupted

    try:
        set_loras(model, [(path, 1.0)])
        with pytest.raises(Interrupted):
            pipe.generate("a dog", callback=interrupt, **GEN)
        assert_bit_identical(model, before)
    finally:
        set_loras(model, [])
    assert_bit_identical(model, before)
    assert torch.equal(pipe.generate("a dog", **GEN).latents, plain.latents)


def test_strength_change_reuses_parsed_file(model, tmp_path, monkeypatch):
    factors = make_factors(model, linear_names(model), 4, seed=9, alpha=3.0)
    path = write_lora(tmp_path / "a.safetensors", factors)
    reads = []
    real_iter = lora.iter_tensors
    monkeypatch.setattr(lora, "iter_tensors", lambda index: reads.append(index.path) or real_iter(index))

    for strength in (1.0, 0.25, -0.6):
        set_loras(model, [(path, strength)])
        expected = forward(hand_merged(model, [(factors, strength)]))
        assert (forward(model) - expected).abs().max().item() <= ATOL
    assert len(reads) == 1

    factors = make_factors(model, linear_names(model), 6, seed=10, alpha=3.0)
    write_lora(path, factors)  # a new file under the same name is read again
    set_loras(model, [(path, 1.0)])
    assert len(reads) == 2
    assert (forward(model) - forward(hand_merged(model, [(factors, 1.0)]))).abs().max().item() <= ATOL


def test_unmatched_keys_are_reported(model, tmp_path):
    factors = make_factors(model, ["transformer_blocks.0.attn1.to_q", "proj_out"], 4, seed=11, alpha=4.0)
    path = write_lora(tmp_path / "mixed.safetensors", factors)
    extra = {
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(4, 32),
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.zeros(32, 4),
        "lora_unet_proj.lora_down.weight": torch.zeros(4, 16, 2, 2),  # the patch Conv2d: not a Linear
        "lora_unet_transformer_blocks_1_attn1_to_k.lora_down.weight": torch.zeros(4, 32),  # no up
        "lora_unet_transformer_blocks_9_attn1_to_q.lora_up.weight": torch.zeros(32, 4),  # no such block
    }
    from safetensors.torch import load_file
    save_file({**load_file(str(path)), **extra}, str(path))

    report = set_loras(model, [(path, 1.0)])

    assert report.targets == 2 and report.files[0].matched == 2
    assert report.files[0].unmatched_keys == sorted(extra)
    summary = report.summary(max_keys=2)
    assert "2 layers, 5 unmatched keys" in summary and "(+3 more)" in summary and sorted(extra)[0] in summary
    expected = forward(hand_merged(model, [(factors, 1.0)]))
    assert (forward(model) - expected).abs().max().item() <= ATOL


def test_bad_files_raise_clear_errors_and_keep_the_previous_set(model, tmp_path):
    good = write_lora(tmp_path / "good.safetensors", make_factors(model, linear_names(model), 4, seed=12))
    set_loras(model, [(good, 1.0)])
    with_lora = forward(model)

    v51 = {"transformer.transformer_blocks.0.attn1.add_q_proj.lora_A.weight": torch.zeros(4, 32),
           "transformer.transformer_blocks.0.attn1.add_q_proj.lora_B.weight": torch.zeros(32, 4)}
    save_file(v51, str(tmp_path / "v51.safetensors"))
    with pytest.raises(CheckpointError, match=r"matches no layer.*V5\.1") as err:
        set_loras(model, [(good, 1.0), (tmp_path / "v51.safetensors", 1.0)])
    assert str(tmp_path / "v51.safetensors") in str(err.value)

    save_file(snapshot(model), str(tmp_path / "full.safetensors"))
    with pytest.raises(CheckpointError, match="full checkpoint") as err:
        set_loras(model, [(tmp_path / "full.safetensors", 1.0)])
    assert str(tmp_path / "full.safetensors") in str(err.value)

    wrong = make_factors(model, ["text_proj"], 4, seed=13)
    wrong["text_proj"] = (torch.zeros(4, 64), torch.zeros(32, 4), None)  # in_features 64, model has 32
    write_lora(tmp_path / "other.safetensors", wrong)
    with pytest.raises(CheckpointError, match="different model"):
        set_loras(model, [(tmp_path / "other.safetensors", 1.0)])

    with pytest.raises(ModelFolderError, match="not found") as err:
        set_loras(model, [(tmp_path / "missing.safetensors", 1.0)])
    assert str(tmp_path / "missing.safetensors") in str(err.value)

    torch.save({"a": torch.zeros(2)}, tmp_path / "old.pt")
    with pytest.raises(CheckpointError, match=r"Only \.safetensors"):
        set_loras(model, [(tmp_path / "old.pt", 1.0)])

    assert torch.equal(forward(model), with_lora)  # every failure left the previous set active


def test_dtype_and_device_moves_after_set(model, tmp_path):
    factors = make_factors(model, linear_names(model), 4, seed=14, alpha=4.0)
    path = write_lora(tmp_path / "a.safetensors", factors)
    with torch.inference_mode():  # as ComfyUI runs nodes
        set_loras(model, [(path, 0.9)])
    assert not model.proj_out.lora_down.is_inference()
    assert "proj_out.lora_down" not in model.state_dict()

    model.to(torch.bfloat16)
    assert model.proj_out.lora_down.dtype == torch.int32  # raw bits: the cast left the factors alone
    assert forward(model, torch.bfloat16).isfinite().all()
    model.to(torch.float32)
    # The base weights went through bf16, the LoRA factors did not.
    assert (forward(model) - forward(hand_merged(model, [(factors, 0.9)]))).abs().max().item() <= ATOL

    on_meta = copy.deepcopy(model).to("meta")  # the factors travel with their layer
    assert all(b.is_meta for n, b in on_meta.named_buffers() if ".lora_" in n)


def upcast_layers(monkeypatch):
    """Stand-in for the coming fp8 mode: Linear and Conv2d cast their weights to the input dtype per call."""
    def linear(self, x):
        return F.linear(x, self.weight.to(x.dtype), self.bias.to(x.dtype))

    def conv(self, x):
        return self._conv_forward(x, self.weight.to(x.dtype), self.bias.to(x.dtype))

    monkeypatch.setattr(nn.Linear, "forward", linear)
    monkeypatch.setattr(nn.Conv2d, "forward", conv)


def test_float8_storage(model, tmp_path, monkeypatch):
    factors = make_factors(model, linear_names(model), 4, seed=15, alpha=4.0)
    path = write_lora(tmp_path / "a.safetensors", factors)
    fp8 = copy.deepcopy(model).to(torch.float8_e4m3fn)
    assert fp8.compute_dtype == torch.bfloat16
    before = snapshot(fp8)
    with pytest.raises(RuntimeError):  # today's layers do not upcast float8 weights on the CPU
        forward(fp8, torch.bfloat16)

    set_loras(fp8, [(path, 1.0)])
    assert fp8.proj_out._lora_dtype == torch.bfloat16
    assert_bit_identical(fp8, before)

    upcast_layers(monkeypatch)
    dequantised = copy.deepcopy(fp8).to(torch.float32)
    remove_loras(dequantised)
    out = forward(fp8, torch.bfloat16)
    expected = forward(hand_merged(dequantised, [(factors, 1.0)]))
    effect = (expected - forward(dequantised)).abs().max().item()
    assert effect > 0.1
    assert (out - expected).abs().max().item() < 0.1 * effect  # bf16 activations vs a float32 reference

    set_loras(fp8, [])
    assert_bit_identical(fp8, before)
    assert_no_lora_left(fp8)

    # Set first, cast to float8 afterwards: the factors keep their precision.
    set_loras(model, [(path, 1.0)])
    down = model.proj_out.lora_down.clone()
    model.to(torch.float8_e4m3fn)
    assert torch.equal(model.proj_out.lora_down, down)
    assert (forward(model, torch.bfloat16) - expected).abs().max().item() < 0.1 * effect
