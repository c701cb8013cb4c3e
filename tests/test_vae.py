"""MagViT VAE: golden encode/decode, checkpoint key layout, chunk caches and spatial tiling."""
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from conftest import golden_path
from easyanimate_core import load_vae
from easyanimate_core.loading import validate_model_dir
from easyanimate_core.models.vae import DiagonalGaussian, MagvitVAE, _tiled

ATOL = 1e-4  # golden README: component tolerance (float32 floor for the VAE is ~1e-5)


def report(name: str, got: torch.Tensor, want: torch.Tensor) -> float:
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    err = (got.float() - want.float()).abs().max().item()
    print(f"[vae golden] {name}: max |diff| = {err:.3e}")
    return err


@pytest.fixture(scope="module")
def tiny_vae() -> MagvitVAE:
    """The golden tiny VAE through the real loader (meta build + streamed weights)."""
    return load_vae(validate_model_dir(golden_path("models", "EasyAnimateV5-tiny-zh")), dtype=torch.float32)


@pytest.fixture(scope="module")
def video_case() -> dict:
    return load_file(golden_path("components", "vae", "video_f9_64x112.safetensors"))


# ------------------------------------------------------------------------------------ goldens


@pytest.mark.parametrize("case", ["video_f9_64x112", "image_f1_64x112"])
@torch.no_grad()
def test_encode_and_decode_match_golden(tiny_vae, case):
    data = load_file(golden_path("components", "vae", f"{case}.safetensors"))
    assert torch.equal(data["input"], data["input_u8"].float() / 127.5 - 1)

    posterior = tiny_vae.encode(data["input"])
    errors = {
        "mean": report(f"{case}/posterior_mean", posterior.mean, data["posterior_mean"]),
        "logvar": report(f"{case}/posterior_logvar", posterior.logvar, data["posterior_logvar"]),
        "std": report(f"{case}/posterior_std", posterior.std, data["posterior_std"]),
        # decode(mean) from the golden mean, so encoder and decoder errors are checked separately
        "decoded": report(f"{case}/decoded_from_mean", tiny_vae.decode(data["posterior_mean"]),
                          data["decoded_from_mean"]),
    }
    assert max(errors.values()) < ATOL, errors
    assert torch.equal(posterior.mode(), posterior.mean)


@torch.no_grad()
def test_decode_random_z_matches_golden(tiny_vae):
    data = load_file(golden_path("components", "vae", "decode_random_z.safetensors"))
    assert report("decode_random_z/decoded", tiny_vae.decode(data["z"]), data["decoded"]) < ATOL


@torch.no_grad()
def test_pipeline_decode_latents_matches_golden(tiny_vae):
    """Stored: latents/0.7125 -> decode -> clamp(-1,1) -> /2+0.5 -> clamp(0,1)."""
    data = load_file(golden_path("components", "vae", "pipeline_decode_latents.safetensors"))
    raw = tiny_vae.decode(data["latents"] / tiny_vae.scaling_factor)
    video = (raw.clamp(-1, 1) / 2 + 0.5).clamp(0, 1)
    assert report("pipeline_decode_latents/video", video, data["video"]) < ATOL


# ------------------------------------------------------------------------------------ layout


def _shapes(module: torch.nn.Module) -> dict:
    return {name: list(t.shape) for name, t in module.state_dict().items()}


def test_full_size_v5_on_meta_matches_manifest():
    manifest = json.loads(golden_path("manifests", "vae_v5.json").read_text())
    with torch.device("meta"):
        vae = MagvitVAE.from_config_dict(manifest["config"])
    assert all(p.is_meta for p in vae.parameters())
    assert list(vae.buffers()) == []
    assert _shapes(vae) == manifest["param_shapes"]
    assert sum(p.numel() for p in vae.parameters()) == manifest["n_params"]
    assert (vae.scaling_factor, vae.latent_channels) == (0.7125, 16)
    assert (vae.spatial_compression, vae.temporal_compression) == (8, 4)


def test_tiny_on_meta_matches_manifest():
    manifest = json.loads(golden_path("manifests", "tiny__vae.json").read_text())
    config = json.loads(golden_path("models", "EasyAnimateV5-tiny-zh", "vae", "config.json").read_text())
    with torch.device("meta"):
        vae = MagvitVAE.from_config_dict(config)
    assert _shapes(vae) == manifest["param_shapes"]


# ------------------------------------------------------------------------------------ behaviour


@torch.no_grad()
def test_shapes_and_frame_rule(tiny_vae):
    z = torch.randn(1, 16, 2, 2, 3)
    assert tiny_vae.decode(z).shape == (1, 3, 5, 16, 24)
    assert tiny_vae.encode(torch.zeros(1, 3, 5, 16, 24)).mean.shape == (1, 16, 2, 2, 3)
    with pytest.raises(ValueError, match="4k\\+1"):
        tiny_vae.encode(torch.zeros(1, 3, 4, 16, 24))
    assert not tiny_vae.has_cached_state()


@torch.no_grad()
def test_batch_matches_single(tiny_vae, video_case):
    x = video_case["input"][:, :, :5, :32, :48]
    pair = torch.cat([x, x.flip(-1)])
    batched = tiny_vae.encode(pair).mean
    assert (batched[:1] - tiny_vae.encode(x).mean).abs().max() < 1e-5
    assert (batched[1:] - tiny_vae.encode(x.flip(-1)).mean).abs().max() < 1e-5


class _Boom(RuntimeError):
    pass


@torch.no_grad()
@pytest.mark.parametrize("direction", ["encode", "decode"])
def test_failed_call_leaves_no_cache(tiny_vae, direction):
    z = torch.randn(1, 16, 3, 2, 3, generator=torch.Generator().manual_seed(0))
    x = torch.rand(1, 3, 9, 16, 24, generator=torch.Generator().manual_seed(1)) * 2 - 1
    run = (lambda: tiny_vae.encode(x).mean) if direction == "encode" else (lambda: tiny_vae.decode(z))
    reference = run()
    assert not tiny_vae.has_cached_state()

    last = (tiny_vae.encoder if direction == "encode" else tiny_vae.decoder).conv_out
    calls = []

    def fail_on_second_chunk(module, args):
        calls.append(1)
        if len(calls) == 2:
            raise _Boom("injected failure mid-call")

    handle = last.register_forward_pre_hook(fail_on_second_chunk)
    try:
        with pytest.raises(_Boom):
            run()
    finally:
        handle.remove()
    assert len(calls) == 2
    assert not tiny_vae.has_cached_state()
    assert torch.equal(run(), reference)


def test_diagonal_gaussian_sampling():
    moments = torch.randn(2, 32, 3, 4, 5, generator=torch.Generator().manual_seed(3))
    moments[:, 16:, 0, 0, 0] = 100.0  # beyond the logvar clamp
    posterior = DiagonalGaussian(moments)
    assert posterior.logvar.max() == 20.0
    assert torch.allclose(posterior.std, torch.exp(0.5 * posterior.logvar))
    drawn = posterior.sample(generator=torch.Generator().manual_seed(7))
    noise = torch.randn(posterior.mean.shape, generator=torch.Generator().manual_seed(7))
    assert torch.equal(drawn, posterior.mean + posterior.std * noise)
    assert torch.equal(posterior.sample(noise=noise), drawn)


@torch.no_grad()
def test_half_precision_weights_run(tiny_vae, video_case):
    vae = MagvitVAE.from_config_dict(
        json.loads(golden_path("models", "EasyAnimateV5-tiny-zh", "vae", "config.json").read_text())
    )
    vae.load_state_dict(tiny_vae.state_dict())
    x = video_case["input"][:, :, :1, :32, :48]
    reference = tiny_vae.encode(x).mean
    for dtype in (torch.bfloat16, torch.float16):
        vae.to(dtype)
        mean = vae.encode(x).mean
        assert mean.dtype == dtype
        assert (mean.float() - reference).abs().max() < 0.1
        assert vae.decode(mean).dtype == dtype


# ------------------------------------------------------------------------------------ tiling


def test_tile_stitching_is_exact_for_local_maps():
    """With a map that has no spatial context, tiles + linear blending reproduce the untiled result."""
    x = torch.randn(1, 3, 2, 64, 112, generator=torch.Generator().manual_seed(0))
    down = lambda t: F.avg_pool3d(t, (1, 8, 8))  # noqa: E731 - stands in for the encoder (pixels -> latents)
    up = lambda t: F.interpolate(t, scale_factor=(1, 8, 8), mode="nearest")  # noqa: E731 - and the decoder
    # Encode geometry for 32 px tiles / 0.25: pixel tile 32, stride 24, latent blend 1, keep 3.
    assert torch.allclose(_tiled(x, down, 32, 24, 1, 3, (8, 14)), down(x), atol=1e-6)
    z = down(x)
    # Decode geometry: latent tile 4, stride 3, pixel blend 8, keep 24.
    assert torch.allclose(_tiled(z, up, 4, 3, 8, 24, (64, 112)), up(z), atol=1e-6)


@torch.no_grad()
def test_tiled_vae_against_untiled(tiny_vae, video_case):
    """Tiled vs untiled on the tiny random VAE at 64x112, 5 frames, with 32 px tiles (overlap 0.25).

    The differences are large by construction, not by a stitching bug (see the exact test above):
    the mid-block attention sees the whole frame untiled but only a 4x4-latent tile when tiled, and
    random weights give far-reaching receptive fields. Measured (torch 2.14, CPU, float32):
    posterior mean 1.428 max diff (|mean| up to 1.359); decoded 2.976 max and 0.373 mean abs diff
    (|x| up to 2.71). A trained VAE with 384 px tiles behaves far better; here the bounds only guard the
    path against regressions.
    """
    x, z = video_case["input"][:, :, :5], video_case["posterior_mean"][:, :, :2]
    untiled_mean, untiled_video = tiny_vae.encode(x).mean, tiny_vae.decode(z)
    try:
        tiny_vae.enable_tiling(tile_sample_min_size=32, tile_overlap_factor=0.25)
        tiled_mean, tiled_video = tiny_vae.encode(x).mean, tiny_vae.decode(z)
    finally:
        tiny_vae.disable_tiling()
    assert tiled_mean.shape == untiled_mean.shape and tiled_video.shape == untiled_video.shape
    enc_max = report("tiled-vs-untiled/posterior_mean", tiled_mean, untiled_mean)
    dec_max = report("tiled-vs-untiled/decoded", tiled_video, untiled_video)
    dec_mean = (tiled_video - untiled_video).abs().mean().item()
    print(f"[vae tiling] decoded mean |diff| = {dec_mean:.3e}")
    assert enc_max < 1.5 and dec_max < 3.1 and dec_mean < 0.39
    assert not tiny_vae.has_cached_state()


@torch.no_grad()
def test_tile_as_large_as_frame_is_untiled(tiny_vae, video_case):
    x = video_case["input"][:, :, :5, :32, :24]
    z = video_case["posterior_mean"][:, :, :2, :4, :3]
    untiled_mean, untiled_video = tiny_vae.encode(x).mean, tiny_vae.decode(z)
    try:
        tiny_vae.enable_tiling(tile_sample_min_size=32)
        assert torch.equal(tiny_vae.encode(x).mean, untiled_mean)
        assert torch.equal(tiny_vae.decode(z), untiled_video)
    finally:
        tiny_vae.disable_tiling()


def test_tiling_options_validated(tiny_vae):
    with pytest.raises(ValueError):
        tiny_vae.enable_tiling(tile_sample_min_size=36)
    with pytest.raises(ValueError):
        tiny_vae.enable_tiling(tile_overlap_factor=1.0)
    assert not tiny_vae.use_tiling
