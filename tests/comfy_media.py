"""Small input files for ComfyUI tests (images and videos in input/), and reading back output videos."""
from __future__ import annotations

from pathlib import Path

import numpy as np

TEST_WIDTH, TEST_HEIGHT = 112, 64
INPUT_VIDEO_FRAMES = 10  # deliberately not 4k+1


def gradient_frames(count: int, height: int = TEST_HEIGHT, width: int = TEST_WIDTH) -> np.ndarray:
    """uint8 [count,H,W,3] moving colour gradients with a white square (something for Canny to find)."""
    y, x = np.mgrid[0:height, 0:width]
    frames = []
    for i in range(count):
        frame = np.stack([(x * 255 // max(width - 1, 1) + 8 * i) % 256, y * 255 // max(height - 1, 1),
                          np.full_like(x, 40 + 10 * i)], axis=-1).astype(np.uint8)
        top, left = height // 4, (width // 4 + 2 * i) % (width - height // 2)
        frame[top:top + height // 2, left:left + height // 2] = 255
        frames.append(frame)
    return np.stack(frames)


def write_test_inputs(input_dir: Path) -> None:
    """start.png, end.png, end_small.png (another size), clip.mp4 (10 frames) and pose.mp4 into input/."""
    import imageio.v2 as imageio

    frames = gradient_frames(INPUT_VIDEO_FRAMES)
    imageio.imwrite(input_dir / "start.png", frames[0])
    imageio.imwrite(input_dir / "end.png", frames[-1])
    imageio.imwrite(input_dir / "end_small.png", gradient_frames(1, 40, 48)[0])
    for name in ("clip.mp4", "pose.mp4"):
        with imageio.get_writer(input_dir / name, fps=8, codec="libx264", macro_block_size=16) as writer:
            for frame in frames:
                writer.append_data(frame)


def read_video(path: Path) -> tuple[int, tuple[int, int], float]:
    """(frame count, (width, height), fps) of a video file, decoded with PyAV."""
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        count = sum(1 for _ in container.decode(stream))
        return count, (stream.codec_context.width, stream.codec_context.height), float(stream.average_rate)
