"""Resolution buckets and frame rounding."""
import pytest

from easyanimate_core.buckets import ASPECT_RATIO_512, bucket_size, latent_frames, round_frames


def test_forty_buckets_with_the_documented_examples():
    assert len(ASPECT_RATIO_512) == 40
    assert ASPECT_RATIO_512[0.57] == (384, 672) and ASPECT_RATIO_512[1.0] == (512, 512)
    assert ASPECT_RATIO_512[1.75] == (672, 384)


@pytest.mark.parametrize("size,base,expected", [
    ((720, 1280), 512, (384, 672)),
    ((1080, 1920), 768, (576, 1008)),
    ((1024, 1024), 960, (960, 960)),
    ((1280, 720), 1024, (1344, 768)),
    ((64, 112), 512, (384, 672)),
])
def test_bucket_size(size, base, expected):
    assert bucket_size(*size, base_resolution=base) == expected


@pytest.mark.parametrize("frames,rounded,latent", [(49, 49, 13), (50, 49, 13), (48, 45, 12), (7, 5, 2), (8, 5, 2),
                                                   (10, 9, 3), (1, 1, 1), (0, 1, 1)])
def test_round_frames(frames, rounded, latent):
    assert round_frames(frames) == rounded and latent_frames(rounded) == latent
