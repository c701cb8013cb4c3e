"""3D rotary position embedding of EasyAnimate V5 (fractional spatial positions over a base grid)."""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

ROPE_THETA = 10000.0


def resize_crop_region(
    grid_h: int, grid_w: int, base_h: int = 30, base_w: int = 45
) -> tuple[tuple[int, int], tuple[int, int]]:
    """Fit the token grid into the base grid keeping its aspect ratio, centred.

    Returns ((top, left), (bottom, right)) in base-grid units. Python's round (half to even) is part
    of the convention: 512x512 gives a left offset of round(7.5) = 8.
    """
    if grid_h / grid_w > base_h / base_w:
        resize_h, resize_w = base_h, int(round(base_h / grid_h * grid_w))
    else:
        resize_h, resize_w = int(round(base_w / grid_w * grid_h)), base_w
    top = int(round((base_h - resize_h) / 2.0))
    left = int(round((base_w - resize_w) / 2.0))
    return (top, left), (top + resize_h, left + resize_w)


def rope_axis_dims(head_dim: int) -> tuple[int, int, int]:
    """Channels per axis (time, height, width): 16/24/24 of 64, 4/6/6 of 16."""
    dims = (head_dim // 4, head_dim // 8 * 3, head_dim // 8 * 3)
    if sum(dims) != head_dim or any(d % 2 for d in dims):
        raise ValueError(f"head_dim {head_dim} cannot be split into even time/height/width parts {dims}")
    return dims


def _linspace_no_endpoint(start: float, stop: float, n: int) -> Tensor:
    # numpy.linspace(start, stop, n, endpoint=False, dtype=float32): float64 arithmetic, then cast.
    step = (stop - start) / n
    return (torch.arange(n, dtype=torch.float64) * step + start).to(torch.float32)


def _axis_angles(positions: Tensor, dim: int) -> Tensor:
    """Rotation angles [n, dim // 2] of one axis, float32 as in the reference."""
    inv_freq = 1.0 / (ROPE_THETA ** (torch.arange(0, dim, 2, dtype=torch.float32)[: dim // 2] / dim))
    return torch.outer(positions, inv_freq)


def build_3d_rope(
    num_frames: int,
    grid_h: int,
    grid_w: int,
    head_dim: int,
    *,
    device=None,
    dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor]:
    """cos, sin tables, each [num_frames * grid_h * grid_w, head_dim], tokens frame, row, column.

    grid_h/grid_w are the token grid (latent size // patch size). Channels are time | height | width,
    each repeat-interleaved (pairs of adjacent channels share one angle). Always computed on the CPU
    in float32 (bit-exact with the reference), then moved/cast.
    """
    (top, left), (bottom, right) = resize_crop_region(grid_h, grid_w)
    dim_t, dim_h, dim_w = rope_axis_dims(head_dim)
    angles_t = _axis_angles(_linspace_no_endpoint(0, num_frames, num_frames), dim_t)
    angles_h = _axis_angles(_linspace_no_endpoint(top, bottom, grid_h), dim_h)
    angles_w = _axis_angles(_linspace_no_endpoint(left, right, grid_w), dim_w)

    shape = (num_frames, grid_h, grid_w)
    angles = torch.cat(
        [
            angles_t[:, None, None, :].expand(*shape, -1),
            angles_h[None, :, None, :].expand(*shape, -1),
            angles_w[None, None, :, :].expand(*shape, -1),
        ],
        dim=-1,
    ).reshape(num_frames * grid_h * grid_w, -1)
    # cos/sin per axis before the concat in the reference; elementwise, so the same values.
    cos = angles.cos().repeat_interleave(2, dim=1)
    sin = angles.sin().repeat_interleave(2, dim=1)
    return cos.to(device=device, dtype=dtype), sin.to(device=device, dtype=dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate adjacent channel pairs of x [..., L, heads, head_dim] by tables [L, head_dim], in float32."""
    x_pairs = x.unflatten(-1, (-1, 2))
    x_rot = torch.stack([-x_pairs[..., 1], x_pairs[..., 0]], dim=-1).flatten(-2)
    cos = cos[:, None, :]
    sin = sin[:, None, :]
    return (x.float() * cos + x_rot.float() * sin).to(x.dtype)


# Devices whose complex multiply we rely on; elsewhere (MPS, ...) RoPE uses the real formula.
COMPLEX_ROPE_DEVICES = ("cpu", "cuda", "meta")


class RopeTables(NamedTuple):
    """One geometry's tables: cos, sin [L, head_dim] float32, and rotation [L, 1, head_dim // 2] complex64
    (cos + i sin of each channel pair, for the one-pass complex multiply; None off COMPLEX_ROPE_DEVICES)."""

    cos: Tensor
    sin: Tensor
    rotation: Tensor | None


def rope_tables(cos: Tensor, sin: Tensor) -> RopeTables:
    """Bundle (cos, sin) tables with their complex form (cos/sin are repeat-interleaved: even channels suffice)."""
    rotation = None
    if cos.device.type in COMPLEX_ROPE_DEVICES:
        rotation = torch.complex(cos[:, 0::2].float(), sin[:, 0::2].float())[:, None, :]
    return RopeTables(cos, sin, rotation)


def apply_rope_into(out: Tensor, x: Tensor, rope: RopeTables) -> None:
    """Write RoPE(x) into `out`, both [..., L, heads, head_dim] (out e.g. a slice of a joint q/k tensor).

    Channel pairs (x0, x1) are complex numbers x0 + i x1 multiplied by cos + i sin: the real and
    imaginary parts are x0 cos - x1 sin and x1 cos + x0 sin, the same products and sums as
    `apply_rope` (bit-identical in float32 on the CPU), read and written in one pass. Other dtypes
    compute in float32 and round once, as `apply_rope` does.
    """
    if rope.rotation is None:
        out.copy_(apply_rope(x, rope.cos, rope.sin))
        return
    if not _pairs_viewable(x):
        x = x.contiguous()
    if x.dtype == torch.float32 and out.dtype == torch.float32 and _pairs_viewable(out):
        x_c = torch.view_as_complex(x.unflatten(-1, (-1, 2)))
        torch.mul(x_c, rope.rotation, out=torch.view_as_complex(out.unflatten(-1, (-1, 2))))
    else:
        x_c = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
        out.copy_(torch.view_as_real(x_c * rope.rotation).flatten(-2))


def _pairs_viewable(t: Tensor) -> bool:
    """Whether view_as_complex accepts t's channel pairs: contiguous pairs, even strides and offset."""
    return t.stride(-1) == 1 and t.storage_offset() % 2 == 0 and all(s % 2 == 0 for s in t.stride()[:-1])
