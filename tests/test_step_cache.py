"""Step caching (easyanimate_core/cache.py) through the real denoise loop: exactness at threshold 0, where skips
happen, one decision per CFG batch, clean install/uninstall, composition with LoRA, fp8 and block swap, and
clear errors for bad settings and for coefficients of another model."""
from __future__ import annotations

import json

import pytest
import torch

from easyanimate_core import UnsupportedRequestError, load_pipeline
from easyanimate_core.block_swap import disable_block_swap, enable_block_swap
from easyanimate_core.cache import (COEFFICIENTS_FILE, CacheSettings, StepCache, load_coefficients, model_kind,
                                    model_size)

STEPS = 12
GEN = dict(height=32, width=32, num_frames=5, num_inference_steps=STEPS, guidance_scale=6.0, seed=7)
PROMPT = "a cat playing guitar"
IDENTITY = [1.0, 0.0]  # teacache polynomial p(x) = x


def teacache(threshold, start=0.1, end=0.9):
    return StepCache(CacheSettings("teacache", threshold, start, end), IDENTITY)


def run(pipe, cache=None, callback=None):
    """Final latents of one denoise (no decode: faster), with the cache's report in `.cache_stats`."""
    prepared = pipe.prepare(**{k: v for k, v in GEN.items() if k != "guidance_scale"})
    latents = pipe.denoise(prepared, pipe.encode_prompt(PROMPT), pipe.encode_prompt(""), GEN["guidance_scale"],
                           callback, cache=cache)
    return Result(latents.cpu(), pipe.last_cache_stats if cache is not None else None)


class Result:
    def __init__(self, latents, stats):
        self.latents, self.cache_stats = latents, stats


@pytest.fixture(scope="module")
def pipe(tiny_pipeline):
    return tiny_pipeline("t2v")


@pytest.fixture(scope="module")
def uncached(pipe):
    return pipe.generate(PROMPT, **GEN)


def count_block_calls(transformer):
    calls = []
    handle = transformer.transformer_blocks[0].register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))
    return calls, handle


# ---------------------------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("make", [lambda: teacache(0.0), lambda: CacheSettings("auto", 0.0)], ids=["teacache", "auto"])
def test_threshold_zero_is_bit_identical_to_no_cache(pipe, uncached, make):
    out = pipe.generate(PROMPT, cache=make(), **GEN)
    assert torch.equal(out.latents, uncached.latents)
    assert torch.equal(out.frames, uncached.frames)
    assert out.cache_stats.passes == STEPS and out.cache_stats.skipped == 0
    assert pipe.transformer.blocks_runner is None


# ---------------------------------------------------------------------------------------------- where skips happen
@pytest.mark.parametrize("make", [lambda s, e: teacache(1e9, s, e), lambda s, e: CacheSettings("auto", 1e9, s, e)],
                         ids=["teacache", "auto"])
@pytest.mark.parametrize("start,end", [(0.1, 0.9), (0.25, 0.5), (0.0, 1.0)])
def test_skips_only_inside_the_window_never_first_or_last(pipe, make, start, end):
    calls, handle = count_block_calls(pipe.transformer)
    try:
        out = run(pipe, make(start, end))
    finally:
        handle.remove()
    stats = out.cache_stats
    # With an unreachable threshold every allowed step is skipped: steps 0 and the last always run, and
    # the first pass also needs a computed one before it to reuse (auto: two, to know its rate).
    first_allowed = max(int(-(-start * STEPS // 1)), 1 if stats.policy == "teacache" else 2)
    expected = [i for i in range(first_allowed, STEPS - 1) if i < end * STEPS]
    assert stats.skipped_steps == expected
    assert stats.passes == STEPS and stats.skipped == len(expected)
    # One decision for the whole CFG batch: every computed pass runs the blocks once on both halves.
    assert calls == [2] * stats.computed
    assert out.latents.isfinite().all()


def test_moderate_threshold_skips_some_and_stays_close(pipe, uncached):
    out = run(pipe, CacheSettings("auto", 0.3))
    stats = out.cache_stats
    assert 0 < stats.skipped < STEPS - 3, stats.describe()
    rel = float((out.latents - uncached.latents).norm() / uncached.latents.norm())
    assert 0 < rel < 0.2
    assert stats.describe().startswith(f"skipped {stats.skipped} of {STEPS} transformer passes")


def test_teacache_accumulates_the_rescaled_change(pipe):
    """A polynomial that doubles the change reaches a threshold sooner, so it skips less than identity."""
    plain = run(pipe, StepCache(CacheSettings("teacache", 0.6), IDENTITY)).cache_stats
    doubled = run(pipe, StepCache(CacheSettings("teacache", 0.6), [2.0, 0.0])).cache_stats
    assert plain.skipped > doubled.skipped


def test_recording_computes_every_pass_and_measures_changes(pipe, uncached):
    cache = StepCache(CacheSettings("teacache", 0.0), record=True)
    assert torch.equal(run(pipe, cache).latents, uncached.latents)
    assert [r[0] for r in cache.stats.records] == list(range(1, STEPS))
    assert all(x > 0 and y > 0 for _, x, y in cache.stats.records)


# ---------------------------------------------------------------------------------------------- install/uninstall
def test_an_error_mid_run_leaves_the_transformer_as_it_was(pipe, uncached):
    seen = []

    def sentinel(transformer, x, ctx, temb, rope):  # a runner someone else installed (e.g. sequence parallel)
        seen.append(1)
        return transformer.run_blocks(x, ctx, temb, rope)

    pipe.transformer.blocks_runner = sentinel
    try:
        def stop(info):
            if info.step == 6:
                raise KeyboardInterrupt  # what Cancel raises inside ComfyUI is an exception too

        with pytest.raises(KeyboardInterrupt):
            run(pipe, CacheSettings("auto", 1e9), stop)
        assert pipe.transformer.blocks_runner is sentinel
        assert 0 < len(seen) < 6  # computed passes went through the runner that was there before
        seen.clear()
        out = run(pipe, CacheSettings("auto", 1e9))
        assert len(seen) == out.cache_stats.computed
    finally:
        pipe.transformer.blocks_runner = None
    assert torch.equal(run(pipe).latents, uncached.latents)


# ---------------------------------------------------------------------------------------------- composition
def test_composes_with_lora(pipe, uncached, tmp_path):
    from tiny_lora import write_tiny_lora

    path = tmp_path / "style.safetensors"
    write_tiny_lora(path, pipe.transformer, rank=4, seed=3, alpha=4.0)
    pipe.set_loras([(str(path), 1.0)])
    try:
        with_lora = run(pipe)
        assert not torch.equal(with_lora.latents, uncached.latents)
        assert torch.equal(run(pipe, CacheSettings("auto", 0.0)).latents, with_lora.latents)
        cached = run(pipe, CacheSettings("auto", 1e9))
        assert cached.cache_stats.skipped > 0
        # The LoRA acts in the computed passes: the cached LoRA run is nearer the LoRA run than the base one.
        assert (cached.latents - with_lora.latents).norm() < (cached.latents - uncached.latents).norm()
    finally:
        pipe.set_loras([])


def test_composes_with_fp8(tiny_model_dir):
    pipe = load_pipeline(tiny_model_dir("t2v"), fp8=True)
    plain = run(pipe)  # fp8 storage, float32 compute
    assert torch.equal(run(pipe, teacache(0.0)).latents, plain.latents)
    cached = run(pipe, teacache(1e9))
    assert cached.cache_stats.skipped > 0 and cached.latents.isfinite().all()


def test_composes_with_compiled_blocks(tiny_model_dir, pipe):
    from easyanimate_core.models.transformer import compile_transformer_blocks

    compiled = load_pipeline(tiny_model_dir("t2v"))
    compile_transformer_blocks(compiled.transformer)
    plain = run(compiled)
    assert torch.equal(run(compiled, teacache(0.0)).latents, plain.latents)
    cached, eager = run(compiled, teacache(0.6)), run(pipe, teacache(0.6))
    assert cached.cache_stats.skipped_steps == eager.cache_stats.skipped_steps and cached.cache_stats.skipped > 0
    assert (cached.latents - eager.latents).abs().max() < 1e-4


@pytest.mark.parametrize("blocks", [1, 2], ids=["last-block-swapped", "all-blocks-swapped"])
def test_composes_with_block_swap(pipe, uncached, blocks):
    """TeaCache reads block 0's modulation even when block swap holds block 0's weights off the device."""
    enable_block_swap(pipe.transformer, blocks, "cpu")
    try:
        assert torch.equal(run(pipe, teacache(0.0)).latents, uncached.latents)
        cached = run(pipe, teacache(0.05))
    finally:
        disable_block_swap(pipe.transformer)
    unswapped = run(pipe, teacache(0.05))
    assert cached.cache_stats.skipped_steps == unswapped.cache_stats.skipped_steps
    assert torch.equal(cached.latents, unswapped.latents)


# ---------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("args,message", [
    (("fastcache", 0.1), "unknown step-cache policy 'fastcache'"),
    (("auto", -0.1), "threshold must be a number ≥ 0"),
    (("auto", 0.1, 0.5, 0.5), "start (0.5) must be before end (0.5)"),
    (("auto", 0.1, 0.8, 0.2), "must be before end"),
    (("auto", 0.1, -0.1, 0.9), "start must be a fraction"),
])
def test_bad_settings_are_clear_errors(args, message):
    with pytest.raises(UnsupportedRequestError) as err:
        CacheSettings(*args)
    assert message in str(err.value)


@pytest.mark.parametrize("text,message", [("teacache", "expected POLICY:THRESHOLD"), ("auto:x", "must be numbers"),
                                          ("nope:0.1", "unknown step-cache policy")])
def test_bad_cli_strings_are_clear_errors(text, message):
    with pytest.raises(UnsupportedRequestError) as err:
        CacheSettings.parse(text)
    assert message in str(err.value)


def test_parse():
    assert CacheSettings.parse("teacache:0.1") == CacheSettings("teacache", 0.1)
    assert CacheSettings.parse("AUTO:0.2:0.2:0.8") == CacheSettings("auto", 0.2, 0.2, 0.8)


def test_teacache_without_coefficients_says_how_to_get_them(pipe):
    with pytest.raises(UnsupportedRequestError) as err:
        run(pipe, CacheSettings("teacache", 0.1))
    assert "calibrate-cache" in str(err.value) and "'auto'" in str(err.value)
    assert pipe.transformer.blocks_runner is None


def test_coefficients_file_of_another_model_is_refused(pipe, tmp_path):
    transformer = pipe.transformer
    kind, size = model_kind(transformer.config), model_size(transformer.config)
    assert (kind, size) == ("t2v", "2 layers x 32 (2 MMDiT)")
    path = tmp_path / COEFFICIENTS_FILE
    path.write_text(json.dumps({"model": {"kind": "inpaint", "size": "V5-12B"}, "teacache": {"coefficients": [1, 0]}}))
    with pytest.raises(UnsupportedRequestError) as err:
        load_coefficients(transformer, tmp_path)
    assert "calibrated for a inpaint model of size V5-12B" in str(err.value) and "t2v" in str(err.value)
    path.write_text(json.dumps({"model": {"kind": kind, "size": size}, "teacache": {"coefficients": [3, 2, 1]}}))
    assert load_coefficients(transformer, tmp_path) == [3.0, 2.0, 1.0]
    path.write_text("{not json")
    with pytest.raises(UnsupportedRequestError, match="not a step-cache coefficients file"):
        load_coefficients(transformer, tmp_path)


# ---------------------------------------------------------------------------------------------- CLI
def test_cli_calibrates_then_generates_with_teacache_and_refuses_another_models_file(tiny_model_dir, tmp_path):
    import shutil

    from test_cli import run_cli

    model = shutil.copytree(tiny_model_dir("t2v"), tmp_path / "model")
    size = ["--height", 32, "--width", 32, "--frames", 5]
    calibrated = run_cli("calibrate-cache", "--model", model, "--prompts", "a cat", "a dog on the beach",
                         "--steps", 8, *size)
    assert calibrated.returncode == 0, calibrated.stderr
    data = json.loads((model / COEFFICIENTS_FILE).read_text())
    assert data["model"] == {"kind": "t2v", "size": "2 layers x 32 (2 MMDiT)"}
    assert data["calibration"]["points"] == 2 * 7 and len(data["teacache"]["coefficients"]) == 5
    assert f"wrote {model / COEFFICIENTS_FILE}" in calibrated.stdout

    generated = run_cli("generate", "--model", model, "--prompt", "a cat", "--steps", 10, *size,
                        "--out", tmp_path / "cached.png", "--cache", "teacache:0.5")
    assert generated.returncode == 0, generated.stderr
    assert "step cache: skipped " in generated.stdout and " of 10 transformer passes" in generated.stdout

    other = shutil.copytree(tiny_model_dir("inpaint"), tmp_path / "inp")
    shutil.copy(model / COEFFICIENTS_FILE, other / COEFFICIENTS_FILE)
    refused = run_cli("generate", "--model", other, "--prompt", "a cat", "--steps", 4, *size,
                      "--out", tmp_path / "x.png", "--cache", "teacache:0.1")
    assert refused.returncode == 2
    assert "was calibrated for a t2v model of size 2 layers x 32 (2 MMDiT), but this model is inpaint" in refused.stderr
    bad = run_cli("generate", "--model", model, "--prompt", "a cat", "--steps", 4, *size,
                  "--out", tmp_path / "y.png", "--cache", "auto:-1")
    assert bad.returncode == 2 and "threshold must be a number ≥ 0" in bad.stderr


def test_teacache_indicator_is_the_first_blocks_modulated_input():
    from tiny_model import random_transformer

    transformer = random_transformer()
    x, ctx, temb = torch.randn(2, 48, 32), torch.randn(2, 20, 32), torch.randn(2, 32)
    with torch.no_grad():
        got = teacache(0.1)._modulated_input(transformer, x, ctx, temb)
        assert torch.equal(got, transformer.transformer_blocks[0].norm1(x, ctx, temb)[0])
