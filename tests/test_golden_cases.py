"""End-to-end goldens: every case of ../shared/golden/cases through the public API.

Tolerances are the golden README's for an independent float32 re-implementation: final latents
atol 2e-4 and video atol 1e-4 (Euler: 2e-3 and 5e-4, since it works at sigma 4096).
"""
import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import golden_path
from easyanimate_core import load_pipeline

CASES = ["a_t2v_64x112_f5_ddim", "b1_t2v_112x64_f9_ddim", "c_t2v3layer_64x112_f5_ddim", "d_t2v_64x112_f5_euler",
         "e_inp_i2v_64x112_f5", "f2_inp_t2v_noimage_64x112_f5", "g_inp_v2v_64x112_f9_s0.7", "i_control_64x112_f9"]
TOLERANCES = {"DDIM": (2e-4, 1e-4), "Euler": (2e-3, 5e-4)}
_PIPELINES = {}


def pipeline_for(model_rel: str):
    if model_rel not in _PIPELINES:
        _PIPELINES[model_rel] = load_pipeline(golden_path(*model_rel.split("/")), device="cpu", dtype=torch.float32)
    return _PIPELINES[model_rel]


def case_call(case_dir):
    """The public-API arguments that replay one recorded case, and the loaded pipeline."""
    case = json.loads((case_dir / "case.json").read_text(encoding="utf-8"))
    call = case["pipeline_call"]
    kwargs = dict(prompt=call["prompt"], negative_prompt=call["negative_prompt"], height=call["height"],
                  width=call["width"], num_frames=call["video_length"], num_inference_steps=call["num_inference_steps"],
                  guidance_scale=call["guidance_scale"], sampler=case["reference"]["sampler"],
                  seed=case["seeds"]["pipeline_generator"], strength=call.get("strength", 1.0))
    if (case_dir / "init_noise.safetensors").exists():
        kwargs["latents"] = load_file(case_dir / "init_noise.safetensors")["init_noise"]
    inputs = load_file(case_dir / "inputs.safetensors") if (case_dir / "inputs.safetensors").exists() else {}
    trace = load_file(case_dir / "trace.safetensors")
    if "start_image_u8" in inputs:
        kwargs["start_image"] = inputs["start_image_u8"].float() / 255
    if "control_video" in call:
        kwargs["control_video"] = inputs["input_frames_u8"].float() / 255
    elif "input_frames_u8" in inputs:
        kwargs["video"] = inputs["input_frames_u8"].float() / 255
    if "ref_noise_out" in trace:
        kwargs["reference_noise"] = trace["ref_noise_out"] - trace["ref_noise_in"]
    if "vae_encode0_sample" in trace:
        std = torch.exp(0.5 * trace["vae_encode0_logvar"])
        kwargs["video_noise"] = (trace["vae_encode0_sample"] - trace["vae_encode0_mean"]) / std
    return case, kwargs, trace


@pytest.mark.parametrize("name", CASES)
def test_case_matches_original(name):
    case_dir = golden_path("cases", name)
    case, kwargs, trace = case_call(case_dir)
    pipe = pipeline_for(case["reference"]["model_dir"])
    steps = []
    out = pipe.generate(**kwargs, callback=lambda info: steps.append(info.latents.clone()))

    want_latents = load_file(case_dir / "final_latents.safetensors")["final_latents"]
    want_video = load_file(case_dir / "video.safetensors")["video"][0].permute(1, 2, 3, 0)
    atol_latents, atol_video = TOLERANCES[kwargs["sampler"]]
    err_latents = (out.latents - want_latents).abs().max().item()
    err_video = (out.frames - want_video).abs().max().item()
    print(f"{name}: final_latents max|diff| {err_latents:.2e}, video max|diff| {err_video:.2e}")
    assert out.frames.shape == want_video.shape
    assert len(steps) == case["n_transformer_calls"]
    for i, latents in enumerate(steps):
        want = trace[f"step{i:02d}_sched_prev_sample"]
        assert torch.allclose(latents, want, rtol=1e-4, atol=atol_latents * 10), f"step {i} diverges"
    assert err_latents <= atol_latents
    assert err_video <= atol_video


def test_prompt_embeddings_match_trace():
    case_dir = golden_path("cases", "b1_t2v_112x64_f9_ddim")
    case, kwargs, trace = case_call(case_dir)
    pipe = pipeline_for(case["reference"]["model_dir"])
    neg, pos = pipe.encode_prompt(kwargs["negative_prompt"]), pipe.encode_prompt(kwargs["prompt"])
    assert torch.allclose(torch.cat([neg.bert, pos.bert]), trace["prompt_embeds"], atol=5e-5)
    assert torch.allclose(torch.cat([neg.t5, pos.t5]), trace["prompt_embeds_2"], atol=1e-4)


def test_seed_alone_reproduces_explicit_noise():
    """Without `latents`, the seed draws the same initial noise the original drew."""
    case_dir = golden_path("cases", "a_t2v_64x112_f5_ddim")
    case, kwargs, _ = case_call(case_dir)
    pipe = pipeline_for(case["reference"]["model_dir"])
    kwargs.pop("latents")
    out = pipe.generate(**kwargs)
    want = load_file(case_dir / "final_latents.safetensors")["final_latents"]
    assert (out.latents - want).abs().max().item() <= 2e-4
