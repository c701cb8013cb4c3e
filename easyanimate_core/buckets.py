"""Resolution buckets and frame-count rules of EasyAnimate V5."""
from __future__ import annotations

# Aspect ratio (height / width) -> (height, width) at base resolution 512: the 40 training buckets.
ASPECT_RATIO_512 = {
    0.25: (256, 1024), 0.26: (256, 992), 0.27: (256, 960), 0.28: (256, 928),
    0.32: (288, 896), 0.33: (288, 864), 0.35: (288, 832), 0.4: (320, 800),
    0.42: (320, 768), 0.48: (352, 736), 0.5: (352, 704), 0.52: (352, 672),
    0.57: (384, 672), 0.6: (384, 640), 0.68: (416, 608), 0.72: (416, 576),
    0.78: (448, 576), 0.82: (448, 544), 0.88: (480, 544), 0.94: (480, 512),
    1.0: (512, 512), 1.07: (512, 480), 1.13: (544, 480), 1.21: (544, 448),
    1.29: (576, 448), 1.38: (576, 416), 1.46: (608, 416), 1.67: (640, 384),
    1.75: (672, 384), 2.0: (704, 352), 2.09: (736, 352), 2.4: (768, 320),
    2.5: (800, 320), 2.89: (832, 288), 3.0: (864, 288), 3.11: (896, 288),
    3.62: (928, 256), 3.75: (960, 256), 3.88: (992, 256), 4.0: (1024, 256),
}
BASE_RESOLUTIONS = (512, 768, 960, 1024)
VAE_TEMPORAL_COMPRESSION = 4
SIZE_MULTIPLE = 16


def bucket_size(height: int, width: int, base_resolution: int = 512) -> tuple[int, int]:
    """(height, width) of the training bucket nearest to the aspect ratio of `height`×`width`.

    The bucket is scaled from base 512 to `base_resolution` and floored to multiples of 16.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    ratio = height / width
    nearest = min(ASPECT_RATIO_512, key=lambda r: abs(r - ratio))
    h, w = ASPECT_RATIO_512[nearest]
    scale = base_resolution / 512
    return floor_to_multiple(h * scale), floor_to_multiple(w * scale)


def floor_to_multiple(value: float, multiple: int = SIZE_MULTIPLE) -> int:
    return int(value // multiple) * multiple


def round_frames(num_frames: int) -> int:
    """Largest valid video length 4k+1 not above `num_frames` (at least 1)."""
    return max(((int(num_frames) - 1) // VAE_TEMPORAL_COMPRESSION) * VAE_TEMPORAL_COMPRESSION + 1, 1)


def latent_frames(num_frames: int) -> int:
    """Number of latent frames the VAE makes of a 4k+1-frame video."""
    return (int(num_frames) - 1) // VAE_TEMPORAL_COMPRESSION + 1
