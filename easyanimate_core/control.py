"""Control-video preprocessing that needs no extra model (Canny edges, one of V5's trained control types)."""
from __future__ import annotations

import numpy as np
import torch

from .errors import UnsupportedRequestError


def canny_frames(frames: torch.Tensor, low_threshold: int = 100, high_threshold: int = 200) -> torch.Tensor:
    """[F,H,W,3] float 0..1 → white-on-black Canny edges [F,H,W,3] float32 0..1 (OpenCV, per frame)."""
    import cv2

    frames = torch.as_tensor(frames)
    if frames.dim() != 4 or frames.shape[-1] not in (1, 3, 4):
        raise UnsupportedRequestError(f"frames must be [frames, height, width, channels]; got {list(frames.shape)}")
    if not 0 <= low_threshold <= high_threshold:
        raise UnsupportedRequestError(
            f"Canny thresholds need 0 <= low <= high; got low={low_threshold}, high={high_threshold}")
    pixels = (frames[..., :3].float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    edges = np.empty(pixels.shape[:3], dtype=np.uint8)
    for i, frame in enumerate(pixels):
        gray = frame[..., 0] if frame.shape[-1] == 1 else cv2.cvtColor(np.ascontiguousarray(frame), cv2.COLOR_RGB2GRAY)
        edges[i] = cv2.Canny(gray, int(low_threshold), int(high_threshold))
    return torch.from_numpy(edges).float().div_(255.0).unsqueeze(-1).expand(-1, -1, -1, 3).contiguous()
