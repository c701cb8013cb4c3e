"""The headless entry point, run as users run it: `python -m easyanimate_core …` in a subprocess."""
import subprocess
import sys

import imageio.v2 as imageio
import numpy as np
from PIL import Image

from conftest import REPO_ROOT


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "easyanimate_core", *map(str, args)], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=600)


def read_mp4(path):
    with imageio.get_reader(str(path)) as reader:
        frames = [np.asarray(f) for f in reader]
        fps = reader.get_meta_data()["fps"]
    return frames, fps


def test_generate_text_to_video_mp4(tiny_model_dir, tmp_path):
    out = tmp_path / "t2v.mp4"
    result = run_cli("generate", "--model", tiny_model_dir("t2v"), "--prompt", "a cat playing guitar", "--out", out,
                     "--height", 64, "--width", 112, "--frames", 9, "--steps", 2, "--fps", 8)
    assert result.returncode == 0, result.stderr
    assert "step 2/2" in result.stdout and "wrote" in result.stdout
    assert "memory: everything resident [gpu, auto]" in result.stdout  # auto on the CPU
    frames, fps = read_mp4(out)
    assert len(frames) == 9 and frames[0].shape == (64, 112, 3) and fps == 8


def test_memory_modes_from_the_command_line(tiny_model_dir, tmp_path):
    args = ["generate", "--model", tiny_model_dir("t2v"), "--prompt", "a cat", "--height", 32, "--width", 32,
            "--frames", 5, "--steps", 2, "--seed", 3]
    plain = run_cli(*args, "--out", tmp_path / "plain.png", "--memory", "gpu")
    swapped = run_cli(*args, "--out", tmp_path / "swapped.png", "--swap-blocks", 1)
    assert plain.returncode == 0 and swapped.returncode == 0, plain.stderr + swapped.stderr
    assert "memory: offload + 1 of 2 blocks swapped [block_swap, requested]" in swapped.stdout
    assert np.array_equal(np.asarray(Image.open(tmp_path / "plain.png")),
                          np.asarray(Image.open(tmp_path / "swapped.png")))
    bad = run_cli(*args, "--out", tmp_path / "x.png", "--memory", "offload", "--swap-blocks", 3)
    assert bad.returncode == 2 and "swap_blocks needs memory mode block_swap" in bad.stderr


def test_generate_image_to_video_sizes_from_the_bucket(tiny_model_dir, tmp_path):
    image = tmp_path / "start.png"
    Image.fromarray((np.random.default_rng(0).random((72, 128, 3)) * 255).astype(np.uint8)).save(image)
    out = tmp_path / "i2v.mp4"
    result = run_cli("generate", "--model", tiny_model_dir("inpaint"), "--prompt", "a dog", "--out", out,
                     "--start-image", image, "--frames", 5, "--steps", 2, "--cfg", 1.0)
    assert result.returncode == 0, result.stderr
    frames, _ = read_mp4(out)
    assert len(frames) == 5 and frames[0].shape == (384, 672, 3)  # 72x128 → bucket 0.57 at base 512


def test_control_video_from_file(tiny_model_dir, tmp_path):
    control = tmp_path / "pose.mp4"
    imageio.mimwrite(str(control), [np.full((64, 64, 3), i * 20, np.uint8) for i in range(7)], fps=8,
                     macro_block_size=1)
    out = tmp_path / "control.mp4"
    result = run_cli("generate", "--model", tiny_model_dir("control"), "--prompt", "a dancer", "--out", out,
                     "--control-video", control, "--steps", 2, "--height", 64, "--width", 64, "--vae-tile", 32)
    assert result.returncode == 0, result.stderr
    frames, _ = read_mp4(out)
    assert len(frames) == 5  # 7 input frames → 4k+1 = 5


def test_bad_model_folder_is_a_clear_error(tmp_path):
    result = run_cli("generate", "--model", tmp_path / "nope", "--prompt", "x", "--out", tmp_path / "x.mp4")
    assert result.returncode == 2
    assert "does not exist" in result.stderr and "Expected layout" in result.stderr
    assert "Traceback" not in result.stderr


def test_refused_request_is_a_clear_error(tiny_model_dir, tmp_path):
    image = tmp_path / "start.png"
    Image.new("RGB", (64, 64)).save(image)
    result = run_cli("generate", "--model", tiny_model_dir("t2v"), "--prompt", "x", "--out", tmp_path / "x.mp4",
                     "--start-image", image, "--steps", 2)
    assert result.returncode == 2 and "cannot take a start or end image" in result.stderr


def test_check_names_the_kind(tiny_model_dir):
    result = run_cli("check", "--model", tiny_model_dir("control"))
    assert result.returncode == 0 and "control model" in result.stdout


def test_long_video_continue_with_a_prompt_per_chunk(tiny_model_dir, tmp_path):
    out = tmp_path / "long.mp4"
    result = run_cli("generate", "--model", tiny_model_dir("inpaint"), "--prompt", "a cat", "--prompt", "a dog",
                     "--out", out, "--height", 32, "--width", 48, "--frames", 21, "--long", "continue",
                     "--chunk-frames", 9, "--overlap", 4, "--steps", 1)
    assert result.returncode == 0, result.stderr
    assert "chunk 4/4 step 4/4" in result.stdout
    assert "note: 21 frames requested, 20 made" in result.stdout
    assert "continue: 4 chunks of up to 9 frames, 20 frames" in result.stdout
    frames, _ = read_mp4(out)
    assert len(frames) == 20 and frames[0].shape == (32, 48, 3)


def test_long_video_errors_from_the_command_line(tiny_model_dir, tmp_path):
    args = ["generate", "--out", tmp_path / "x.mp4", "--height", 32, "--width", 48, "--frames", 21, "--steps", 1]
    bad = run_cli(*args, "--model", tiny_model_dir("t2v"), "--prompt", "a cat", "--long", "continue",
                  "--chunk-frames", 9)
    assert bad.returncode == 2 and "Load an InP model" in bad.stderr and "'windows'" in bad.stderr
    bad = run_cli(*args, "--model", tiny_model_dir("t2v"), "--prompt", "a", "--prompt", "b")
    assert bad.returncode == 2 and "add --long" in bad.stderr
