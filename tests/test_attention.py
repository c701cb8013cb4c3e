"""Attention backends: sdpa default, clear errors for flash/sage when they cannot run, layouts of the adapters."""
import copy
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from tiny_model import random_transformer

from easyanimate_core import attention
from easyanimate_core.attention import (
    AttentionBackendError,
    available_attention_backends,
    sdpa_attention,
    set_attention_backend,
)
from easyanimate_core.errors import UnsupportedRequestError


@pytest.fixture(scope="module")
def base():
    return random_transformer(num_layers=3, mmdit_layers=2)


@pytest.fixture
def model(base):
    return copy.deepcopy(base)


def forward(model):
    g = torch.Generator().manual_seed(1)
    args = (torch.randn(2, 16, 2, 8, 8, generator=g), torch.tensor([700.0, 300.0]),
            torch.randn(2, 5, 32, generator=g), torch.randn(2, 7, 48, generator=g))
    with torch.inference_mode():
        return model(*args)


def installed(module):
    import importlib.util
    return importlib.util.find_spec(module) is not None


def test_sdpa_is_the_default_and_selecting_it_changes_nothing(model):
    assert model.attention_backend == "sdpa"
    assert all(block.attention_fn is sdpa_attention for block in model.transformer_blocks)
    before = forward(model)
    set_attention_backend(model, "sdpa")
    assert torch.equal(forward(model), before)
    assert "sdpa" in available_attention_backends()


@pytest.mark.parametrize("name, package", [("flash", "flash-attn"), ("sage", "sageattention")])
def test_missing_package_raises_naming_it(model, monkeypatch, name, package):
    monkeypatch.setattr(attention.AttentionBackend, "installed", lambda self: self.module is None)
    with pytest.raises(AttentionBackendError, match=f"pip install {package}"):
        set_attention_backend(model, name)
    assert model.attention_backend == "sdpa"
    assert all(block.attention_fn is sdpa_attention for block in model.transformer_blocks)


@pytest.mark.skipif(installed("flash_attn") or installed("sageattention"), reason="a backend package is installed")
def test_absent_packages_are_reported_as_such(model):
    assert available_attention_backends() == ["sdpa"]
    for name in ("flash", "sage"):
        with pytest.raises(AttentionBackendError, match="not installed"):
            set_attention_backend(model, name)


@pytest.mark.parametrize("name", ["flash", "sage"])
def test_cpu_or_float32_model_is_refused_up_front(model, monkeypatch, name):
    monkeypatch.setattr(attention.AttentionBackend, "installed", lambda self: True)
    with pytest.raises(AttentionBackendError, match="runs on CUDA GPUs only, but the model is on cpu"):
        set_attention_backend(model, name)  # a CPU model
    with pytest.raises(AttentionBackendError, match="float16 or bfloat16"):
        set_attention_backend(model, name, device="cuda")  # offloaded now, but float32
    backend = attention.get_attention_backend(name)
    with pytest.raises(AttentionBackendError, match="float16 or bfloat16"):
        backend.check("cuda", torch.float32)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    backend.check("cuda", torch.bfloat16)  # fine
    with pytest.raises(AttentionBackendError, match="head_dim"):
        backend.check("cuda", torch.float16, head_dim=512)


def test_call_time_guard_when_the_model_moved_after_selection(model, monkeypatch):
    monkeypatch.setattr(attention.AttentionBackend, "installed", lambda self: True)
    for block in model.transformer_blocks:
        block.attention_fn = attention.BACKENDS["flash"].fn  # as if selected on a GPU, then moved to the CPU
    with pytest.raises(AttentionBackendError, match="CUDA"):
        forward(model)


def test_unknown_backend(model):
    with pytest.raises(AttentionBackendError, match="choose one of flash, sage, sdpa"):
        set_attention_backend(model, "xformers")
    assert issubclass(AttentionBackendError, UnsupportedRequestError)


def test_flash_and_sage_adapters_pass_their_layouts(model, monkeypatch):
    """Stand-in packages that check the layout they get and compute attention with SDPA: the whole model
    must give the sdpa output through each adapter."""
    calls = []

    def nhd_attention(q, k, v):  # [B, L, heads, d] in and out
        assert q.stride(-1) == 1 and q.shape[1] > q.shape[2]
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2).contiguous()

    def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False):
        assert dropout_p == 0.0 and softmax_scale is None and not causal
        calls.append("flash")
        return nhd_attention(q, k, v)

    def sageattn(q, k, v, tensor_layout="HND", is_causal=False, sm_scale=None):
        assert tensor_layout == "NHD" and not is_causal and sm_scale is None
        calls.append("sage")
        return nhd_attention(q, k, v)

    monkeypatch.setitem(sys.modules, "flash_attn", types.SimpleNamespace(flash_attn_func=flash_attn_func))
    monkeypatch.setitem(sys.modules, "sageattention", types.SimpleNamespace(sageattn=sageattn))
    monkeypatch.setattr(attention.AttentionBackend, "installed", lambda self: True)
    monkeypatch.setattr(attention, "_check_tensors", lambda name, q: None)  # let them run on CPU float32
    monkeypatch.setattr(attention.AttentionBackend, "check", lambda self, *a, **k: None)

    expected = forward(model)
    for name in ("flash", "sage"):
        set_attention_backend(model, name)
        assert model.attention_backend == name
        out = forward(model)
        assert (out - expected).abs().max().item() < 1e-5, name
    assert calls.count("flash") == calls.count("sage") == len(model.transformer_blocks)


def test_sdpa_attention_shapes():
    q, k, v = (torch.randn(2, 3, 10, 16) for _ in range(3))
    torch.testing.assert_close(sdpa_attention(q, k, v), F.scaled_dot_product_attention(q, k, v))
