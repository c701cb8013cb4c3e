"""What each model kind accepts: refused combinations say why and what to load instead."""
import json
import re

import pytest
import torch

from easyanimate_core import UnsupportedRequestError
from easyanimate_core.samplers import SAMPLER_NAMES, make_scheduler

SMALL = dict(height=32, width=32, num_frames=5, num_inference_steps=2)
IMAGE = torch.rand(32, 32, 3)
VIDEO = torch.rand(5, 32, 32, 3)
MASK = torch.ones(5, 32, 32)


@pytest.mark.parametrize("kind,kwargs,message", [
    ("t2v", {"start_image": IMAGE}, r"text-to-video \(T2V\) model; it cannot take a start or end image.*InP model"),
    ("t2v", {"end_image": IMAGE}, r"T2V\) model; it cannot take a start or end image"),
    ("t2v", {"video": VIDEO, "mask": MASK}, r"T2V\) model; it cannot take a mask.*EasyAnimateV5-12b-zh-InP"),
    ("t2v", {"control_video": VIDEO}, r"T2V\) model; it cannot take a control video.*EasyAnimateV5-12b-zh-Control"),
    ("inpaint", {"control_video": VIDEO}, r"InP \(image/video-conditioned\) model; it cannot take a control video"
                                         r".*EasyAnimateV5-12b-zh-Control"),
    ("control", {"start_image": IMAGE, "control_video": VIDEO}, r"Control model; it cannot take a start/end image"),
    ("control", {"video": VIDEO, "strength": 0.5, "control_video": VIDEO}, r"Control model; it cannot take"),
    ("control", {}, r"a Control model needs a control video"),
    ("inpaint", {"mask": MASK}, r"a mask needs an input video"),
    ("inpaint", {"strength": 0.5}, r"strength < 1 is video-to-video and needs an input video"),
    ("inpaint", {"video": VIDEO}, r"input video without a mask at strength 1.0 would be ignored"),
    ("inpaint", {"video": VIDEO, "start_image": IMAGE}, r"either start/end images or an input video"),
    ("t2v", {"strength": 0.0, "video": VIDEO}, r"strength must be in \(0, 1\]"),
    ("t2v", {"sampler": "PNDM", "num_inference_steps": 3}, r"the PNDM sampler needs at least 4 steps \(got 3\)"),
    ("t2v", {"sampler": "LMS"}, r"unknown sampler 'LMS'; choose one of DDIM, Euler, Euler A, DPM\+\+, PNDM"),
    ("t2v", {"video": VIDEO, "strength": 0.1}, r"leaves no step to run"),
])
def test_refused(tiny_pipeline, kind, kwargs, message):
    pipe = tiny_pipeline(kind)
    with pytest.raises(UnsupportedRequestError, match=message):
        pipe.generate("a cat", **{**SMALL, **kwargs})


@pytest.mark.parametrize("kind,kwargs", [
    ("t2v", {}),
    ("t2v", {"video": VIDEO, "strength": 0.7}),
    ("inpaint", {}),
    ("inpaint", {"start_image": IMAGE}),
    ("inpaint", {"start_image": IMAGE, "end_image": IMAGE}),
    ("inpaint", {"end_image": IMAGE}),
    ("inpaint", {"video": VIDEO, "strength": 0.7}),
    ("inpaint", {"video": VIDEO, "mask": MASK * 0 + (torch.arange(32) < 16).float()[None, :, None]}),
    ("control", {"control_video": VIDEO}),
])
def test_accepted(tiny_pipeline, kind, kwargs):
    out = tiny_pipeline(kind).generate("a cat", **{**SMALL, **kwargs})
    assert out.frames.shape == (5, 32, 32, 3)
    assert torch.isfinite(out.frames).all() and 0 <= out.frames.min() and out.frames.max() <= 1


def test_sizes_and_frames_are_rounded_and_inputs_resized(tiny_pipeline):
    pipe = tiny_pipeline("inpaint")
    out = pipe.generate("a cat", height=40, width=50, num_frames=8, num_inference_steps=2,
                        start_image=torch.rand(100, 70, 3))
    assert out.frames.shape == (5, 32, 48, 3)  # 8 → 5 frames, 40×50 → 32×48
    assert out.latents.shape == (1, 16, 2, 4, 6)


def test_video_length_follows_a_shorter_input_video(tiny_pipeline):
    out = tiny_pipeline("t2v").generate("a cat", height=32, width=32, num_frames=49, num_inference_steps=2,
                                        video=torch.rand(11, 32, 32, 3), strength=0.5)
    assert out.frames.shape[0] == 9


def test_strength_below_one_uses_the_video(tiny_pipeline):
    """Unlike the original, explicit latents do not silently disable video-to-video."""
    pipe = tiny_pipeline("inpaint")
    noise = torch.randn(1, 16, 2, 4, 4)
    a = pipe.generate("a cat", **SMALL, video=torch.zeros(5, 32, 32, 3), strength=0.5, latents=noise)
    b = pipe.generate("a cat", **SMALL, video=torch.ones(5, 32, 32, 3), strength=0.5, latents=noise)
    assert (a.latents - b.latents).abs().max() > 1e-3


def test_same_seed_same_result_other_seed_differs(tiny_pipeline):
    pipe = tiny_pipeline("t2v")
    a, b = pipe.generate("a cat", **SMALL, seed=1), pipe.generate("a cat", **SMALL, seed=1)
    c = pipe.generate("a cat", **SMALL, seed=2)
    assert torch.equal(a.latents, b.latents) and not torch.equal(a.latents, c.latents)


@pytest.mark.parametrize("strength", [1.0, 0.6])
@pytest.mark.parametrize("sampler", SAMPLER_NAMES)
def test_every_sampler_runs(tiny_pipeline, sampler, strength):
    steps = 8 if strength < 1 else (4 if sampler == "PNDM" else 3)
    video = VIDEO if strength < 1 else None
    seen = []
    out = tiny_pipeline("t2v").generate("a cat", **{**SMALL, "num_inference_steps": steps}, sampler=sampler,
                                        video=video, strength=strength, callback=seen.append)
    assert torch.isfinite(out.latents).all()
    assert len(seen) >= int(steps * strength)


def test_euler_a_is_seeded(tiny_pipeline):
    pipe = tiny_pipeline("t2v")
    runs = [pipe.generate("a cat", **SMALL, sampler="Euler A", seed=s).latents for s in (5, 5, 6)]
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])


def test_error_mid_run_leaves_the_model_untouched(tiny_pipeline):
    pipe = tiny_pipeline("inpaint")
    before = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    vae_before = {k: v.clone() for k, v in pipe.vae.state_dict().items()}
    reference = pipe.generate("a cat", **SMALL, seed=3).latents

    def interrupt(info):
        if info.step == 1:
            raise KeyboardInterrupt("cancelled")

    with pytest.raises(KeyboardInterrupt):
        pipe.generate("a cat", **SMALL, seed=3, callback=interrupt)
    assert all(torch.equal(before[k], v) for k, v in pipe.transformer.state_dict().items())
    assert all(torch.equal(vae_before[k], v) for k, v in pipe.vae.state_dict().items())
    assert torch.equal(pipe.generate("a cat", **SMALL, seed=3).latents, reference)


def test_progress_callback_sees_every_step(tiny_pipeline):
    seen = []
    tiny_pipeline("t2v").generate("a cat", **{**SMALL, "num_inference_steps": 3}, callback=seen.append)
    assert [s.step for s in seen] == [1, 2, 3] and all(s.total == 3 for s in seen)
    assert seen[0].denoised is not None and seen[0].denoised.shape == seen[0].latents.shape


def test_guidance_off_uses_one_pass(tiny_pipeline):
    pipe = tiny_pipeline("t2v")
    calls = []
    handle = pipe.transformer.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))
    try:
        pipe.generate("a cat", **SMALL, guidance_scale=1.0)
    finally:
        handle.remove()
    assert calls == [1, 1]


def test_schedulers_match_original(golden, tiny_model_dir):
    config = json.loads((tiny_model_dir("t2v") / "scheduler" / "scheduler_config.json").read_text())
    index = json.loads(golden("components", "schedulers", "index.json").read_text())
    for name in SAMPLER_NAMES:
        assert make_scheduler(name, config).__class__.__name__ == index[name]["class"]
        for key, recorded in index[name].items():
            if not key.startswith("steps_"):
                continue
            scheduler = make_scheduler(name, config)
            scheduler.set_timesteps(int(key[6:]))
            assert scheduler.timesteps.float().tolist() == recorded["timesteps"], (name, key)
            assert float(scheduler.init_noise_sigma) == pytest.approx(recorded["init_noise_sigma"], rel=1e-6)
            if "sigmas" in recorded:  # diffusers 0.31 vs current differ by float32 rounding only
                torch.testing.assert_close(scheduler.sigmas.float(), torch.tensor(recorded["sigmas"]),
                                           rtol=1e-5, atol=0)


def test_vae_tiling_switch(tiny_pipeline):
    pipe = tiny_pipeline("inpaint")
    kwargs = dict(SMALL, height=64, width=64, start_image=torch.rand(64, 64, 3), seed=4)
    plain = pipe.generate("a cat", **kwargs)
    try:
        pipe.set_vae_tiling(True, tile_sample_min_size=64)  # one tile covers the frame: identical result
        assert torch.equal(pipe.generate("a cat", **kwargs).frames, plain.frames)
        pipe.set_vae_tiling(True, tile_sample_min_size=32)
        tiled = pipe.generate("a cat", **kwargs)
        assert tiled.frames.shape == plain.frames.shape and torch.isfinite(tiled.frames).all()
    finally:
        pipe.set_vae_tiling(False)
    assert torch.equal(pipe.generate("a cat", **kwargs).frames, plain.frames)


@pytest.mark.parametrize("channels, note", [(4, "has an alpha channel (RGBA): the alpha is dropped"),
                                            (1, "is grayscale: its gray is repeated into RGB")])
def test_rgba_and_grayscale_images_are_converted_with_a_warning(tiny_pipeline, channels, note):
    """Images enter as RGB whatever their channels: alpha dropped, gray repeated (same result as the RGB image)."""
    pipe = tiny_pipeline("inpaint")
    rgb = IMAGE if channels == 4 else IMAGE[..., :1].expand(-1, -1, 3)
    given = torch.cat([IMAGE, torch.rand(32, 32, 1)], dim=-1) if channels == 4 else IMAGE[..., :1]
    with pytest.warns(UserWarning, match=rf"start_image {re.escape(note)}"):
        converted = pipe.generate("a cat", **SMALL, seed=3, start_image=given)
    assert torch.equal(converted.latents, pipe.generate("a cat", **SMALL, seed=3, start_image=rgb).latents)
