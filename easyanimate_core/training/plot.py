"""A loss-curve picture (Pillow), for the ComfyUI node's IMAGE output."""
from __future__ import annotations

import numpy as np
import torch


def loss_curve_image(losses: list[float], width: int = 640, height: int = 320) -> torch.Tensor:
    """[1, height, width, 3] float 0..1: the loss per step (grey) and its running mean (blue), axes labelled."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    left, right, top, bottom = 56, width - 12, 24, height - 28
    draw.rectangle([left, top, right, bottom], outline=(160, 160, 160))
    values = np.asarray([v for v in losses if np.isfinite(v)], dtype=np.float64)
    if values.size:
        lo, hi = float(values.min()), float(values.max())
        hi = hi if hi > lo else lo + 1.0
        window = max(1, len(values) // 20)
        smooth = np.convolve(values, np.ones(window) / window, mode="valid")

        def points(series, offset=0):
            n = max(len(values) - 1, 1)
            return [(left + (i + offset) / n * (right - left), bottom - (v - lo) / (hi - lo) * (bottom - top))
                    for i, v in enumerate(series)]

        if len(values) > 1:
            draw.line(points(values), fill=(170, 170, 170), width=1)
            draw.line(points(smooth, offset=window - 1), fill=(30, 90, 200), width=2)
        else:
            x, y = points(values)[0]
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=(30, 90, 200))
        draw.text((4, top - 4), f"{hi:.3g}", fill="black")
        draw.text((4, bottom - 8), f"{lo:.3g}", fill="black")
        draw.text((left, bottom + 6), "step 1", fill="black")
        draw.text((right - 60, bottom + 6), f"step {len(values)}", fill="black")
        draw.text((left + 8, 4), f"loss (last {values[-1]:.4f}, mean of last {window}: {smooth[-1]:.4f})", fill="black")
    else:
        draw.text((left + 8, 4), "no finished step", fill="black")
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).unsqueeze(0)
