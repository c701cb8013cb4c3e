"""Render the example inputs the shipped workflows load (run from the pack folder: python example_inputs/render.py).

Everything is drawn here with numpy (nothing copied from elsewhere), small and deterministic:
  start_frame.png   a seaside scene at dawn (Image to Video, First/Last Frame)
  end_frame.png     the same scene later, the sun higher and the boat further (First/Last Frame)
  input_video.mp4   49 frames at 8 fps of that scene with the boat sailing (Video to Video, Region Inpaint, Canny)
  pose_video.mp4    49 frames of an OpenPose-style stick figure waving (Control pose)
  mask.png          white = regenerate: an ellipse over the boat's path (Region Inpaint; its red channel)
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
WIDTH, HEIGHT = 448, 256  # the 0.57 aspect bucket of the workflows' 672x384 output
FRAMES, FPS = 49, 8


def scene(t: float) -> np.ndarray:
    """The seaside at time t in [0, 1]: sky, sun, sea with waves, a hill and a sailing boat; uint8 [H,W,3]."""
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float32)
    horizon = HEIGHT * 0.58
    sky_top, sky_low = np.array([40 + 60 * t, 70 + 80 * t, 140 + 80 * t]), np.array([250, 170 + 40 * t, 120 + 60 * t])
    k = np.clip(y / horizon, 0, 1)[..., None]
    image = sky_top * (1 - k) + sky_low * k
    sun_x, sun_y = WIDTH * (0.25 + 0.1 * t), horizon - 20 - 70 * t
    sun = np.clip(1.2 - np.hypot(x - sun_x, y - sun_y) / 22, 0, 1)[..., None]
    image = image * (1 - sun) + np.array([255, 236, 170]) * sun
    sea = (y >= horizon)[..., None]
    depth = np.clip((y - horizon) / (HEIGHT - horizon), 0, 1)[..., None]
    waves = 0.5 + 0.5 * np.sin(x / 9 + y / 3 + 12 * t)[..., None] * np.exp(-depth * 1.5)
    water = np.array([30, 90, 140]) * (1 - depth) + np.array([10, 40, 80]) * depth + 18 * waves
    image = np.where(sea, water, image)
    hill = y > horizon - 38 * np.exp(-((x - WIDTH * 0.85) / 70) ** 2)
    image = np.where(hill[..., None] & ~sea, np.array([50, 95, 60]), image)
    bx, by = WIDTH * (0.3 + 0.35 * t), horizon + 28
    hull = (np.abs(y - by) < 6) & (np.abs(x - bx) < 26 - (y - by + 6))
    mast = (np.abs(x - bx) < 1.5) & (y > by - 44) & (y < by - 5)
    sail = (x > bx + 2) & (x < bx + 2 + (y - (by - 44)) * 0.55) & (y > by - 44) & (y < by - 8)
    image = np.where(hull[..., None], np.array([110, 60, 35]), image)
    image = np.where(mast[..., None], np.array([60, 40, 30]), image)
    image = np.where(sail[..., None], np.array([245, 245, 235]), image)
    return np.clip(image, 0, 255).astype(np.uint8)


LIMBS = [  # OpenPose body-18 pairs and their colours
    ((1, 2), (255, 0, 0)), ((1, 5), (255, 85, 0)), ((2, 3), (255, 170, 0)), ((3, 4), (255, 255, 0)),
    ((5, 6), (170, 255, 0)), ((6, 7), (85, 255, 0)), ((1, 8), (0, 255, 0)), ((8, 9), (0, 255, 85)),
    ((9, 10), (0, 255, 170)), ((1, 11), (0, 255, 255)), ((11, 12), (0, 170, 255)), ((12, 13), (0, 85, 255)),
    ((1, 0), (0, 0, 255)),
]


def pose(t: float) -> np.ndarray:
    """An OpenPose-style skeleton on black, its right arm waving and its body swaying; uint8 [H,W,3]."""
    cx, s = WIDTH / 2 + 12 * np.sin(2 * np.pi * t), HEIGHT / 260
    wave = np.sin(4 * np.pi * t)
    points = {0: (0, -100), 1: (0, -78), 2: (-22, -76), 3: (-40 - 10 * wave, -105), 4: (-30 - 28 * wave, -135),
              5: (22, -76), 6: (34, -45), 7: (38, -14), 8: (-12, -10), 9: (-14, 35), 10: (-16, 80),
              11: (12, -10), 12: (14, 35), 13: (16, 80)}
    points = {k: (cx + px * s * 1.1, HEIGHT * 0.55 + py * s) for k, (px, py) in points.items()}
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float32)
    image = np.zeros((HEIGHT, WIDTH, 3), np.float32)
    for (a, b), colour in LIMBS:
        (ax, ay), (bx, by) = points[a], points[b]
        length = max(np.hypot(bx - ax, by - ay), 1e-3)
        u = np.clip(((x - ax) * (bx - ax) + (y - ay) * (by - ay)) / length ** 2, 0, 1)
        near = np.hypot(x - (ax + u * (bx - ax)), y - (ay + u * (by - ay))) < 3.5
        image[near] = np.array(colour) * 0.6
    for px, py in points.values():
        image[np.hypot(x - px, y - py) < 4] = (255, 255, 255)
    return image.astype(np.uint8)


def mask() -> np.ndarray:
    """White ellipse over the boat's path on black; uint8 [H,W,3] (LoadImageMask reads its red channel)."""
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float32)
    inside = ((x - WIDTH * 0.47) / (WIDTH * 0.3)) ** 2 + ((y - HEIGHT * 0.6) / (HEIGHT * 0.22)) ** 2 <= 1
    return np.repeat(np.where(inside, 255, 0).astype(np.uint8)[..., None], 3, axis=-1)


def write_video(path: Path, frames) -> None:
    import imageio.v2 as imageio

    with imageio.get_writer(path, fps=FPS, codec="libx264", quality=None, macro_block_size=16,
                            ffmpeg_params=["-crf", "30", "-preset", "veryslow"]) as writer:
        for frame in frames:
            writer.append_data(frame)


def main() -> None:
    from PIL import Image

    Image.fromarray(scene(0.0)).save(HERE / "start_frame.png", optimize=True)
    Image.fromarray(scene(1.0)).save(HERE / "end_frame.png", optimize=True)
    Image.fromarray(mask()).save(HERE / "mask.png", optimize=True)
    write_video(HERE / "input_video.mp4", (scene(i / (FRAMES - 1)) for i in range(FRAMES)))
    write_video(HERE / "pose_video.mp4", (pose(i / (FRAMES - 1)) for i in range(FRAMES)))


if __name__ == "__main__":
    main()
