"""Long videos (easyanimate_core/long_video.py): the original's continuation against its golden output,
context windows on every model kind, per-chunk prompts, bad input and Cancel."""
import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import golden_path
from easyanimate_core import UnsupportedRequestError, load_pipeline
from easyanimate_core import long_video
from easyanimate_core.context_windows import WindowedModel, plan_windows, window_weights
from easyanimate_core.long_video import Chunk, plan_chunks

_GOLDEN = {}


def golden_long_case():
    """(case.json, chunks.safetensors, video [F,H,W,3], pipeline) of long_t2v_o4, loaded once."""
    if not _GOLDEN:
        case_dir = golden_path("cases", "long_t2v_o4")
        case = json.loads((case_dir / "case.json").read_text(encoding="utf-8"))
        pipe = load_pipeline(golden_path("models", "EasyAnimateV5-tiny-zh-InP"))
        _GOLDEN.update(case=case, chunks=load_file(case_dir / "chunks.safetensors"),
                       video=load_file(case_dir / "video.safetensors")["video"][0].permute(1, 2, 3, 0), pipe=pipe)
    return _GOLDEN["case"], _GOLDEN["chunks"], _GOLDEN["video"], _GOLDEN["pipe"]


def golden_call(case) -> dict:
    s = case["settings"]
    return dict(prompt=s["prompt"], negative_prompt=s["negative_prompt"], height=s["height"], width=s["width"],
                num_frames=s["requested_total_frames"], chunk_frames=s["partial_video_length"],
                overlap_frames=s["overlap_video_length"], num_inference_steps=s["num_inference_steps"],
                guidance_scale=s["guidance_scale"], sampler=s["sampler"], seed=s["seed"])


def test_chunk_schedule_is_the_originals():
    chunks, notes = plan_chunks(21, 9, 4)
    assert [(c.start, c.length, c.known) for c in chunks] == [(0, 9, 0), (5, 9, 4), (10, 9, 4), (15, 5, 4)]
    assert "20 made" in notes[0]
    chunks, _ = plan_chunks(145, 49, 4)
    assert [(c.start, c.length) for c in chunks] == [(0, 49), (45, 49), (90, 49), (135, 9)]
    assert chunks[-1].end == 144
    # overlap 2 with 17 frames: the remainder rounds down to 1 frame, where the original crashes: skipped
    chunks, notes = plan_chunks(17, 9, 2)
    assert [c.length for c in chunks] == [9, 9] and "skipped" in notes[0]
    chunks, notes = plan_chunks(7, 9, 4)
    assert chunks == [Chunk(0, 0, 5, 0)] and "single clip" in notes[0]


def test_golden_long_t2v_o4_from_the_seed():
    """The whole algorithm from the seed alone: every noise draw, the uint8 hand-over, the cross-fade."""
    case, chunks, video, pipe = golden_long_case()
    handed_over = []
    original = long_video.to_uint8_frames

    def record(frames):
        handed_over.append(original(frames))
        return handed_over[-1]

    long_video.to_uint8_frames = record
    try:
        out = pipe.generate_long(**golden_call(case))
    finally:
        long_video.to_uint8_frames = original
    assert out.frames.shape == video.shape  # 21 requested, 20 made, as in the original
    assert [(c.start, c.length) for c in out.chunks] == [(c["init_frames"], c["length"]) for c in case["chunks"]]
    assert (out.chunk_latents[0] - chunks["chunk0_final_latents"]).abs().max() <= 2e-4
    for c, frames in enumerate(handed_over, start=1):
        diff = (frames.int() - chunks[f"chunk{c}_start_frames_u8"].int()).abs()
        assert diff.max() <= 1 and (diff > 0).float().mean() <= 0.02, f"chunk {c} start frames"
    only_chunk0 = 5  # frames 0-4 come from chunk 0 alone (frame 5 is 1·chunk0[5] + 0·chunk1[0])
    err = (out.frames - video).abs()
    print(f"long_t2v_o4: chunk0 frames {err[:only_chunk0].max():.2e}, later frames {err[only_chunk0:].max():.2e}")
    assert err[:only_chunk0].max() <= 1e-4
    assert err[only_chunk0:].max() <= 5e-3


def test_golden_long_t2v_o4_each_chunk_with_recorded_inputs():
    """The tight check: the recorded start frames injected and the recorded noise given, every chunk's
    final latents match at the float32 floor."""
    case, chunks, video, pipe = golden_long_case()
    recorded = iter([chunks[f"chunk{c}_start_frames_u8"] for c in range(1, len(case["chunks"]))])
    original = long_video.to_uint8_frames
    long_video.to_uint8_frames = lambda frames: next(recorded)
    try:
        out = pipe.generate_long(**golden_call(case),
                                 chunk_latents=[chunks[f"chunk{c}_init_noise"] for c in range(len(case["chunks"]))])
    finally:
        long_video.to_uint8_frames = original
    for c in range(len(case["chunks"])):
        err = (out.chunk_latents[c] - chunks[f"chunk{c}_final_latents"]).abs().max().item()
        print(f"chunk {c}: final latents max|diff| {err:.2e}")
        assert err <= 2e-4, f"chunk {c}"


def test_windows_plan_and_weights():
    windows = plan_windows(13, 5, 2)
    assert windows == [(0, 5), (3, 8), (6, 11), (8, 13)]
    total = torch.zeros(13)
    for i, (a, b) in enumerate(windows):
        total[a:b] += window_weights(windows, i, "linear")
    assert torch.allclose(total, torch.ones(13))  # linear weights cross-fade: they add up to 1 everywhere
    assert window_weights(windows, 0, "pyramid").tolist() == [1, 2, 3, 2, 1]
    assert plan_windows(4, 5, 2) == [(0, 4)]


def test_one_window_is_a_plain_generation(tiny_pipeline):
    pipe = tiny_pipeline("t2v")
    kw = dict(height=32, width=48, num_inference_steps=2, seed=5)
    plain = pipe.generate("a cat", num_frames=9, **kw)
    long = pipe.generate_long("a cat", num_frames=9, chunk_frames=9, mode="windows", **kw)
    assert torch.equal(long.chunk_latents[0], plain.latents)
    assert long.transformer_passes == 2


@pytest.mark.parametrize("kind", ["t2v", "inpaint", "control"])
def test_windows_mode_every_kind(tiny_pipeline, kind):
    pipe = tiny_pipeline(kind)
    extra = {}
    if kind == "inpaint":
        extra = dict(start_image=torch.rand(32, 48, 3), end_image=torch.rand(32, 48, 3))
    if kind == "control":
        extra = dict(control_video=torch.rand(25, 32, 48, 3))
    steps = []
    out = pipe.generate_long(["a cat", "a dog"], height=32, width=48, num_frames=25, chunk_frames=9,
                             overlap_frames=4, mode="windows", num_inference_steps=2, seed=1,
                             callback=lambda info: steps.append((info.step, info.total)), **extra)
    # 7 latent frames in windows of 3 overlapping by 1: (0,3) (2,5) (4,7)
    assert out.windows == [(0, 3), (2, 5), (4, 7)]
    assert out.frames.shape == (25, 32, 48, 3)
    assert out.transformer_passes == 2 * 3
    assert steps == [(1, 2), (2, 2)]
    assert torch.isfinite(out.frames).all()


def test_windows_fuse_window_predictions(tiny_pipeline):
    """A frame only one window covers gets exactly that window's transformer output, run with its own
    RoPE positions from 0; shared frames get the weighted mean."""
    from easyanimate_core.pipeline import call_transformer

    pipe = tiny_pipeline("control")
    torch.manual_seed(0)
    x = torch.randn(1, 16, 7, 4, 6)
    control = torch.randn(1, 16, 7, 4, 6)
    text = pipe.encode_prompt("a cat")
    t = torch.tensor([500.0])
    windows = [(0, 3), (2, 5), (4, 7)]
    fused = WindowedModel(windows, "linear")(pipe.transformer, x, t, text, None, control)
    parts = [call_transformer(pipe.transformer, x[:, :, a:b], t, text, None, control[:, :, a:b]) for a, b in windows]
    assert torch.allclose(fused[:, :, :2], parts[0][:, :, :2], atol=1e-6)
    assert torch.allclose(fused[:, :, 3], parts[1][:, :, 1], atol=1e-6)
    assert torch.allclose(fused[:, :, 2], 0.5 * parts[0][:, :, 2] + 0.5 * parts[1][:, :, 0], atol=1e-6)
    whole = call_transformer(pipe.transformer, x, t, text, None, control)
    assert not torch.allclose(fused[:, :, 5:], whole[:, :, 5:], atol=1e-3)  # each window sees only its own frames


def test_continue_prompt_per_chunk_and_progress(tiny_pipeline):
    pipe = tiny_pipeline("inpaint")
    kw = dict(height=32, width=48, num_frames=13, chunk_frames=9, overlap_frames=4, num_inference_steps=2, seed=3)
    steps = []
    one = pipe.generate_long("a cat", **kw, callback=lambda i: steps.append((i.step, i.total, i.chunk, i.chunks)))
    two = pipe.generate_long(["a cat", "a dog"], **kw)
    assert steps == [(1, 4, 0, 2), (2, 4, 0, 2), (3, 4, 1, 2), (4, 4, 1, 2)]
    assert torch.equal(one.chunk_latents[0], two.chunk_latents[0])
    assert not torch.allclose(one.chunk_latents[1], two.chunk_latents[1])
    assert torch.equal(one.frames[:5], two.frames[:5])  # before the seam only chunk 0 is used
    with pytest.raises(UnsupportedRequestError, match="3 prompts for 2 chunks"):
        pipe.generate_long(["a", "b", "c"], **kw)


def test_continue_with_start_and_end_image(tiny_pipeline):
    pipe = tiny_pipeline("inpaint")
    start, end = torch.rand(32, 48, 3), torch.rand(32, 48, 3)
    kw = dict(height=32, width=48, num_frames=13, chunk_frames=9, overlap_frames=4, num_inference_steps=2, seed=3)
    ref = [torch.randn(1, 3, 9, 32, 48) * 0.0563, None]  # None: chunk 1 draws its own from the seed
    with_end = pipe.generate_long("a cat", **kw, start_image=start, end_image=end, chunk_reference_noise=ref)
    without = pipe.generate_long("a cat", **kw, start_image=start, chunk_reference_noise=ref)
    plain = pipe.generate("a cat", height=32, width=48, num_frames=9, num_inference_steps=2, seed=3,
                          start_image=start, reference_noise=ref[0])
    assert torch.equal(without.chunk_latents[0], plain.latents)  # chunk 0 is a plain image-to-video run
    assert torch.equal(with_end.chunk_latents[0], without.chunk_latents[0])  # the end image: last chunk only
    assert not torch.allclose(with_end.chunk_latents[1], without.chunk_latents[1])


@pytest.mark.parametrize("kind", ["t2v", "control"])
def test_continue_needs_an_inp_model(tiny_pipeline, kind):
    with pytest.raises(UnsupportedRequestError, match="InP model.*windows"):
        tiny_pipeline(kind).generate_long("a cat", height=32, width=48, num_frames=13, chunk_frames=9)


@pytest.mark.parametrize("chunk, overlap, message", [(9, 9, "overlap_frames must be"), (10, 4, "4k\\+1"),
                                                     (9, 0, "overlap_frames must be"), (1, 0, "4k\\+1")])
def test_bad_lengths(tiny_pipeline, chunk, overlap, message):
    with pytest.raises(UnsupportedRequestError, match=message):
        tiny_pipeline("inpaint").generate_long("a cat", height=32, width=48, num_frames=33, chunk_frames=chunk,
                                               overlap_frames=overlap)


def test_bad_mode_and_noise_lists(tiny_pipeline):
    pipe = tiny_pipeline("inpaint")
    kw = dict(height=32, width=48, num_frames=13, chunk_frames=9, num_inference_steps=1)
    with pytest.raises(UnsupportedRequestError, match="mode must be"):
        pipe.generate_long("a cat", mode="loop", **kw)
    with pytest.raises(UnsupportedRequestError, match="chunk_latents has 1 entries but this video has 2 chunks"):
        pipe.generate_long("a cat", chunk_latents=[torch.zeros(1, 16, 3, 4, 6)], **kw)


def test_cancel_leaves_the_model_untouched(tiny_pipeline):
    pipe = tiny_pipeline("inpaint")
    before = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    kw = dict(height=32, width=48, num_frames=13, chunk_frames=9, overlap_frames=4, num_inference_steps=2, seed=3)

    def cancel(info):
        if info.chunk == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pipe.generate_long("a cat", **kw, callback=cancel)
    after = pipe.transformer.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    again = pipe.generate_long("a cat", **kw)
    first = pipe.generate_long("a cat", **kw)
    assert torch.equal(again.frames, first.frames)


def test_streamed_decode_is_the_whole_decode(tiny_pipeline):
    """decode_latents writes one causal chunk at a time into the output: the same frames, bit for bit."""
    from easyanimate_core.vae_io import decode_latents

    vae = tiny_pipeline("t2v").vae
    scaled = torch.randn(1, 16, 4, 4, 6, generator=torch.Generator().manual_seed(0))
    z = scaled / vae.scaling_factor
    with torch.inference_mode():
        whole = vae.decode(z)
        pieces = list(vae.decode_pieces(z))
        frames = decode_latents(vae, scaled)
    assert len(pieces) == 4 and torch.equal(torch.cat(pieces, dim=2), whole)
    assert not vae.has_cached_state()
    want = (whole.clamp(-1, 1) * 0.5 + 0.5)[0].permute(1, 2, 3, 0)
    assert frames.shape == (13, 32, 48, 3) and torch.equal(frames, want)
