"""TeaCache calibration: measure how a model's output change follows its modulated-input change, fit a polynomial.

    data = calibrate(pipe, ["a cat playing guitar", ...], height=384, width=672, num_frames=49)
    path = write_coefficients(pipe.model_dir, data)   # <model>/step_cache.json, read by cache.load_coefficients

Each generation runs uncached, recording per step (relative L1 change of block 0's modulated input, relative
L1 change of the block-stack output) against the previous step; the polynomial maps the first to the second,
so the accumulated value TeaCache compares with its threshold estimates the output change since the last
computed pass.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from .cache import COEFFICIENTS_FILE, CacheSettings, StepCache, model_kind, model_size
from .errors import UnsupportedRequestError

DEFAULT_PROMPTS = (
    "A young woman with beautiful clear eyes and blonde hair, wearing white clothes, dancing in a sunny garden.",
    "A cat playing guitar on a city street at night, camera moves slowly.",
    "Waves rolling onto a beach at sunset, high quality, masterpiece.",
)
DEFAULT_DEGREE = 4


def calibrate(pipe, prompts=DEFAULT_PROMPTS, *, height: int = 384, width: int = 672, num_frames: int = 49,
              num_inference_steps: int = 50, guidance_scale: float = 6.0, sampler: str = "DDIM", seed: int = 43,
              negative_prompt: str = "", degree: int = DEFAULT_DEGREE, log=print) -> dict:
    """Run one uncached generation per prompt, recording (input change, output change) per step; fit and
    return the coefficients file's content (see write_coefficients)."""
    prompts = [p for p in prompts if p and p.strip()]
    if not prompts:
        raise UnsupportedRequestError("calibration needs at least one non-empty prompt")
    if num_inference_steps < 4:
        raise UnsupportedRequestError("calibration needs at least 4 steps per generation")
    points = []
    negative = pipe.encode_prompt(negative_prompt) if guidance_scale > 1.0 else None
    for i, prompt in enumerate(prompts):
        start = time.perf_counter()
        prepared = pipe.prepare(height=height, width=width, num_frames=num_frames,
                                num_inference_steps=num_inference_steps, sampler=sampler, seed=seed + i)
        recorder = StepCache(CacheSettings("teacache", 0.0), record=True)
        pipe.denoise(prepared, pipe.encode_prompt(prompt), negative, guidance_scale, cache=recorder)
        points += [(x, y) for _, x, y in recorder.stats.records]
        log(f"calibration run {i + 1}/{len(prompts)}: {len(recorder.stats.records)} step pairs "
            f"in {time.perf_counter() - start:.1f}s")
    xs, ys = np.array([p[0] for p in points]), np.array([p[1] for p in points])
    degree = max(1, min(int(degree), len(points) - 1))
    coefficients = np.polyfit(xs, ys, degree)
    fitted = np.polyval(coefficients, xs)
    config = pipe.transformer.config
    return {
        "model": {"kind": model_kind(config), "size": model_size(config)},
        "teacache": {"coefficients": [float(c) for c in coefficients], "degree": degree,
                     "input": "relative L1 change of block 0's timestep-modulated video input, step to step",
                     "output": "relative L1 change of the block-stack output, step to step"},
        "calibration": {"prompts": list(prompts), "height": height, "width": width, "num_frames": num_frames,
                        "steps": num_inference_steps, "guidance_scale": guidance_scale, "sampler": sampler,
                        "points": len(points),
                        "mean_abs_fit_error": float(np.abs(fitted - ys).mean()),
                        "mean_output_change": float(ys.mean())},
        "samples": [[round(float(x), 6), round(float(y), 6)] for x, y in points],
    }


def write_coefficients(model_dir, data: dict, path=None) -> Path:
    """Write the calibration result where load_coefficients looks for it (<model>/step_cache.json)."""
    path = Path(path) if path is not None else Path(model_dir) / COEFFICIENTS_FILE
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    return path
