"""The EasyAnimate Cache node inside a real ComfyUI server: the sampler's result and report equal the core's."""
from __future__ import annotations

from comfy_server import node_texts
from test_comfy_nodes import NEGATIVE, PROMPT, graph, run_error, run_ok, saved_latent

from comfy_media import TEST_HEIGHT, TEST_WIDTH
from easyanimate_core.cache import CacheSettings


def cached_graph(policy="auto", threshold=0.1, start=0.1, end=0.9, steps=10, seed=9):
    prompt = graph("t2v", steps=steps, seed=seed, save="latent")
    prompt["50"] = {"class_type": "EasyAnimateCache",
                    "inputs": {"policy": policy, "threshold": threshold, "start": start, "end": end}}
    prompt["4"]["inputs"]["cache"] = ["50", 0]
    return prompt


def core_run(tiny_pipeline, settings, steps=10, seed=9):
    return tiny_pipeline("t2v").generate(PROMPT, NEGATIVE, height=TEST_HEIGHT, width=TEST_WIDTH, num_frames=5,
                                         num_inference_steps=steps, seed=seed, cache=settings)


def test_cache_node_result_and_report_equal_the_core(comfy, tiny_pipeline):
    # Threshold 0: exactly the uncached video, nothing skipped.
    entry = run_ok(comfy, cached_graph(threshold=0.0))
    plain = core_run(tiny_pipeline, None)
    assert (saved_latent(comfy, entry) - plain.latents).abs().max() <= 1e-5
    assert "step cache: skipped 0 of 10 transformer passes" in node_texts(entry, "4")[-1]

    # A threshold that skips: the same passes skipped, the same latent, reported under the sampler.
    entry = run_ok(comfy, cached_graph(threshold=5.0, start=0.2, end=0.8))
    core = core_run(tiny_pipeline, CacheSettings("auto", 5.0, 0.2, 0.8))
    stats = core.cache_stats
    assert stats.skipped == 6 and stats.skipped_steps == [2, 3, 4, 5, 6, 7]
    assert "step cache: skipped 6 of 10 transformer passes (60%, auto threshold 5)" in node_texts(entry, "4")[-1]
    assert (saved_latent(comfy, entry) - core.latents).abs().max() <= 1e-5
    assert tiny_pipeline("t2v").transformer.blocks_runner is None


def test_cache_node_bad_settings_are_clear_errors(comfy):
    error = run_error(comfy, cached_graph(start=0.6, end=0.4))
    assert "step-cache start (0.6) must be before end (0.4)" in error["exception_message"]
    # The tiny model folder holds no calibration: teacache says how to get one, or to use auto.
    error = run_error(comfy, cached_graph(policy="teacache"))
    assert "calibrate-cache" in error["exception_message"] and "'auto'" in error["exception_message"]
