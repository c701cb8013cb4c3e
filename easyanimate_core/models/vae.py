"""EasyAnimate V5 causal MagViT video VAE (``AutoencoderKLMagvit``, ``cache_mag_vae`` mode).

8x spatial and 4x temporal compression, 16 latent channels. Video is processed in temporal chunks:
the encoder sees frame 0 alone and then chunks of ``mini_batch_encoder`` frames, the decoder sees
latent 0 alone and then ``mini_batch_decoder`` latents at a time. Every causal convolution carries the
last frames of its input over to the next chunk, so chunks are not independent; those caches live
on the modules during one ``encode``/``decode`` call and are always cleared when the call ends.

State-dict names and shapes are those of the published ``vae/diffusion_pytorch_model.safetensors``.
"""
from __future__ import annotations

import ast
from typing import Callable, Iterable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DiagonalGaussian", "MagvitVAE"]

_ACTIVATIONS = {"silu": nn.SiLU, "swish": nn.SiLU, "gelu": nn.GELU, "relu": nn.ReLU, "mish": nn.Mish}
_NORM_EPS = 1e-6


def _activation(name: str) -> nn.Module:
    try:
        return _ACTIVATIONS[name.lower()]()
    except KeyError:
        raise ValueError(f"unsupported VAE activation {name!r}; known: {sorted(_ACTIVATIONS)}") from None


def _frame_group_norm(norm: nn.GroupNorm, x: torch.Tensor, per_frame: bool) -> torch.Tensor:
    """GroupNorm over [B,C,T,H,W], either per frame (``spatial_group_norm``) or over the whole clip."""
    if not per_frame:
        return norm(x)
    b, c, t, h, w = x.shape
    y = norm(x.transpose(1, 2).reshape(b * t, c, h, w))
    return y.reshape(b, t, c, h, w).transpose(1, 2)


class DiagonalGaussian:
    """Posterior N(mean, exp(logvar)) from the encoder moments ``[B, 2*C, T, h, w]``."""

    def __init__(self, moments: torch.Tensor):
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    @classmethod
    def from_mean_std(cls, mean: torch.Tensor, std: torch.Tensor) -> "DiagonalGaussian":
        """Rebuild a posterior from a stored mean and standard deviation (e.g. after a round trip)."""
        posterior = cls.__new__(cls)
        posterior.mean, posterior.std = mean, std
        posterior.logvar = 2 * torch.log(std)
        return posterior

    def mode(self) -> torch.Tensor:
        return self.mean

    def sample(self, noise: Optional[torch.Tensor] = None,
               generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """``mean + std * noise``; noise is drawn from ``generator`` when not given."""
        if noise is None:
            noise = torch.randn(self.mean.shape, generator=generator, dtype=self.mean.dtype, device=self.mean.device)
        return self.mean + self.std * noise.to(device=self.mean.device, dtype=self.mean.dtype)


# --------------------------------------------------------------------------------------------------
# Streaming building blocks
# --------------------------------------------------------------------------------------------------


class CausalConv3d(nn.Conv3d):
    """3D convolution that is causal in time and streams over temporal chunks.

    The first chunk is left-padded with replicas of its first frame; each later chunk is prefixed
    with the cached tail of the previous (padded) input. A temporally strided conv only takes
    ``pad - (stride - 1)`` cached frames, exactly as the original does.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3,
                 stride: Sequence[int] = (1, 1, 1), spatial_padding: int = 1):
        super().__init__(in_channels, out_channels, kernel_size, stride=tuple(stride),
                         padding=(0, spatial_padding, spatial_padding))
        self.time_pad = self.kernel_size[0] - 1
        self._cache: Optional[torch.Tensor] = None

    def reset_cache(self) -> None:
        self._cache = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.time_pad > 0:
            if self._cache is None:
                x = F.pad(x, (0, 0, 0, 0, self.time_pad, 0), mode="replicate")
            else:
                carried = self.time_pad - (self.stride[0] - 1)
                x = torch.cat([self._cache[:, :, self._cache.shape[2] - carried:], x], dim=2)
            self._cache = x[:, :, -self.time_pad:].clone()
        return super().forward(x)


class ResidualBlock3D(nn.Module):
    """GroupNorm-act-conv twice, plus a 1x1x1 shortcut when the width changes."""

    def __init__(self, in_channels: int, out_channels: int, groups: int, act_fn: str, per_frame_norm: bool):
        super().__init__()
        self.per_frame_norm = per_frame_norm
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=_NORM_EPS)
        self.conv1 = CausalConv3d(in_channels, out_channels)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=_NORM_EPS)
        self.conv2 = CausalConv3d(out_channels, out_channels)
        self.act = _activation(act_fn)
        if in_channels != out_channels:
            self.shortcut = nn.Conv3d(in_channels, out_channels, kernel_size=1)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = self.shortcut(x)
        x = self.conv1(self.act(_frame_group_norm(self.norm1, x, self.per_frame_norm)))
        x = self.conv2(self.act(_frame_group_norm(self.norm2, x, self.per_frame_norm)))
        return x + residual


class SpatialAttention(nn.Module):
    """Self-attention over the pixels of each frame separately, with a residual connection."""

    def __init__(self, channels: int, heads: int, groups: int):
        super().__init__()
        if channels % heads:
            raise ValueError(f"{channels} channels do not split into {heads} attention heads")
        self.heads = heads
        self.group_norm = nn.GroupNorm(groups, channels, eps=_NORM_EPS)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape
        tokens = x.permute(0, 2, 3, 4, 1).reshape(b * t, h * w, c)
        normed = self.group_norm(tokens.transpose(1, 2)).transpose(1, 2)

        def heads(proj: nn.Linear) -> torch.Tensor:
            return proj(normed).view(b * t, h * w, self.heads, c // self.heads).transpose(1, 2)

        out = F.scaled_dot_product_attention(heads(self.to_q), heads(self.to_k), heads(self.to_v))
        out = self.to_out(out.transpose(1, 2).reshape(b * t, h * w, c)) + tokens
        return out.view(b, t, h, w, c).permute(0, 4, 1, 2, 3)


class MidBlock3D(nn.Module):
    """``convs[0]``, then (attention, conv) pairs: ``layers - 1`` of them."""

    def __init__(self, channels: int, layers: int, groups: int, act_fn: str, per_frame_norm: bool,
                 use_attention: bool, attention_type: str, attention_heads: int):
        super().__init__()
        if use_attention and attention_type != "spatial":
            raise ValueError(f"mid_block_attention_type {attention_type!r} is not supported (V5 uses 'spatial')")
        self.convs = nn.ModuleList(
            ResidualBlock3D(channels, channels, groups, act_fn, per_frame_norm) for _ in range(layers)
        )
        n_attn = layers - 1 if use_attention else 0
        self.attentions = nn.ModuleList(SpatialAttention(channels, attention_heads, groups) for _ in range(n_attn))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.convs[0](x)
        for i, conv in enumerate(self.convs[1:]):
            if i < len(self.attentions):
                x = self.attentions[i](x)
            x = conv(x)
        return x


class Downsampler3D(nn.Module):
    """Stride-2 conv (spatial, and temporal when ``temporal``) after a right/bottom zero pad."""

    def __init__(self, channels: int, temporal: bool):
        super().__init__()
        stride = (2 if temporal else 1, 2, 2)
        self.conv = CausalConv3d(channels, channels, stride=stride, spatial_padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsampler3D(nn.Module):
    """Nearest 2x spatial upsampling and a conv; optionally 2x temporal upsampling after the conv.

    The temporal step is skipped for the first chunk of a call (latent 0 decodes to one frame).
    """

    def __init__(self, channels: int, temporal: bool, per_frame_norm: bool):
        super().__init__()
        self.conv = CausalConv3d(channels, channels)
        self.temporal = temporal
        # The original switches to nearest temporal upsampling together with spatial_group_norm.
        self.temporal_mode = "nearest" if per_frame_norm else "trilinear"
        self._seen_first_chunk = False

    def reset_cache(self) -> None:
        self._seen_first_chunk = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(F.interpolate(x, scale_factor=(1, 2, 2), mode="nearest"))
        if self.temporal:
            if self._seen_first_chunk:
                x = F.interpolate(x, scale_factor=(2, 1, 1), mode=self.temporal_mode)
            self._seen_first_chunk = True
        return x


class DownBlock3D(nn.Module):
    """Residual blocks, then an optional downsampler ('spatial' or 'temporal')."""

    def __init__(self, in_channels: int, out_channels: int, layers: int, groups: int, act_fn: str,
                 per_frame_norm: bool, downsample: Optional[str]):
        super().__init__()
        self.convs = nn.ModuleList(
            ResidualBlock3D(in_channels if i == 0 else out_channels, out_channels, groups, act_fn, per_frame_norm)
            for i in range(layers)
        )
        self.downsampler = None if downsample is None else Downsampler3D(out_channels, downsample == "temporal")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv in self.convs:
            x = conv(x)
        return x if self.downsampler is None else self.downsampler(x)


class UpBlock3D(nn.Module):
    """Residual blocks, then an optional upsampler ('spatial' or 'temporal')."""

    def __init__(self, in_channels: int, out_channels: int, layers: int, groups: int, act_fn: str,
                 per_frame_norm: bool, upsample: Optional[str]):
        super().__init__()
        # Registration order mirrors the checkpoint: the spatial-only block creates its upsampler first.
        if upsample == "spatial":
            self.upsampler = Upsampler3D(in_channels, False, per_frame_norm)
        self.convs = nn.ModuleList(
            ResidualBlock3D(in_channels if i == 0 else out_channels, out_channels, groups, act_fn, per_frame_norm)
            for i in range(layers)
        )
        if upsample == "temporal":
            self.upsampler = Upsampler3D(out_channels, True, per_frame_norm)
        elif upsample is None:
            self.upsampler = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv in self.convs:
            x = conv(x)
        return x if self.upsampler is None else self.upsampler(x)


_DOWN_KINDS = {"SpatialDownBlock3D": "spatial", "SpatialTemporalDownBlock3D": "temporal"}
_UP_KINDS = {"SpatialUpBlock3D": "spatial", "SpatialTemporalUpBlock3D": "temporal"}


def _kind(table: dict, name: str) -> str:
    if name not in table:
        raise ValueError(f"unsupported VAE block type {name!r}; known: {sorted(table)}")
    return table[name]


class Encoder(nn.Module):
    """Pixels -> moments (mean and logvar) of one temporal chunk."""

    def __init__(self, in_channels: int, latent_channels: int, block_out_channels: Sequence[int],
                 down_block_types: Sequence[str], layers: int, groups: int, act_fn: str, per_frame_norm: bool,
                 mid_kwargs: dict):
        super().__init__()
        self.per_frame_norm = per_frame_norm
        self.conv_in = CausalConv3d(in_channels, block_out_channels[0])
        self.down_blocks = nn.ModuleList()
        prev = block_out_channels[0]
        last = len(block_out_channels) - 1
        for i, (ch, block_type) in enumerate(zip(block_out_channels, down_block_types)):
            kind = _kind(_DOWN_KINDS, block_type)
            self.down_blocks.append(
                DownBlock3D(prev, ch, layers, groups, act_fn, per_frame_norm, None if i == last else kind)
            )
            prev = ch
        self.mid_block = MidBlock3D(prev, layers, groups, act_fn, per_frame_norm, **mid_kwargs)
        self.conv_norm_out = nn.GroupNorm(groups, prev, eps=_NORM_EPS)
        self.conv_act = _activation(act_fn)
        self.conv_out = CausalConv3d(prev, 2 * latent_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        x = self.conv_act(_frame_group_norm(self.conv_norm_out, x, self.per_frame_norm))
        return self.conv_out(x)


class Decoder(nn.Module):
    """Latents (after ``post_quant_conv``) -> pixels of one temporal chunk."""

    def __init__(self, latent_channels: int, out_channels: int, block_out_channels: Sequence[int],
                 up_block_types: Sequence[str], layers: int, groups: int, act_fn: str, per_frame_norm: bool,
                 mid_kwargs: dict):
        super().__init__()
        self.per_frame_norm = per_frame_norm
        reversed_channels = list(reversed(block_out_channels))
        self.conv_in = CausalConv3d(latent_channels, reversed_channels[0])
        self.mid_block = MidBlock3D(reversed_channels[0], layers, groups, act_fn, per_frame_norm, **mid_kwargs)
        self.up_blocks = nn.ModuleList()
        prev = reversed_channels[0]
        last = len(reversed_channels) - 1
        for i, (ch, block_type) in enumerate(zip(reversed_channels, up_block_types)):
            kind = _kind(_UP_KINDS, block_type)
            self.up_blocks.append(
                UpBlock3D(prev, ch, layers + 1, groups, act_fn, per_frame_norm, None if i == last else kind)
            )
            prev = ch
        self.conv_norm_out = nn.GroupNorm(groups, prev, eps=_NORM_EPS)
        self.conv_act = _activation(act_fn)
        self.conv_out = CausalConv3d(prev, out_channels)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        x = self.conv_act(_frame_group_norm(self.conv_norm_out, x, self.per_frame_norm))
        return self.conv_out(x)


# --------------------------------------------------------------------------------------------------
# Spatial tiling helpers
# --------------------------------------------------------------------------------------------------


def _blend_into(prev: torch.Tensor, cur: torch.Tensor, extent: int, dim: int) -> None:
    """Linear cross-fade of ``prev``'s trailing ``extent`` rows/cols into ``cur``'s leading ones (in place)."""
    extent = min(prev.shape[dim], cur.shape[dim], extent)
    if extent <= 0:
        return
    ramp = torch.arange(extent, device=cur.device, dtype=torch.float32) / extent
    shape = [1] * cur.ndim
    shape[dim] = extent
    ramp = ramp.view(shape).to(cur.dtype)
    tail = prev.narrow(dim, prev.shape[dim] - extent, extent)
    head = cur.narrow(dim, 0, extent)
    head.copy_(tail * (1 - ramp) + head * ramp)


def _tiled(x: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor], tile: int, stride: int,
           blend: int, keep: int, out_hw: tuple) -> torch.Tensor:
    """Run ``fn`` on overlapping spatial tiles of ``x`` and stitch the results with linear blending."""
    h, w = x.shape[-2:]
    rows = [[fn(x[..., i:i + tile, j:j + tile]) for j in range(0, w, stride)] for i in range(0, h, stride)]
    stitched = []
    for i, row in enumerate(rows):
        for j, cur in enumerate(row):
            if i > 0:
                _blend_into(rows[i - 1][j], cur, blend, dim=3)
            if j > 0:
                _blend_into(row[j - 1], cur, blend, dim=4)
        stitched.append(torch.cat([t[..., :keep, :keep] for t in row], dim=4))
    return torch.cat(stitched, dim=3)[..., :out_hw[0], :out_hw[1]]


# --------------------------------------------------------------------------------------------------
# The VAE
# --------------------------------------------------------------------------------------------------


def _as_list(value) -> list:
    return list(ast.literal_eval(value) if isinstance(value, str) else value)


class MagvitVAE(nn.Module):
    """EasyAnimate V5 ``AutoencoderKLMagvit`` (inference only)."""

    _CONFIG_KEYS = (
        "in_channels", "out_channels", "latent_channels", "block_out_channels", "down_block_types",
        "up_block_types", "layers_per_block", "norm_num_groups", "act_fn", "mid_block_use_attention",
        "mid_block_attention_type", "mid_block_num_attention_heads", "spatial_group_norm", "scaling_factor",
        "mini_batch_encoder", "mini_batch_decoder", "tile_sample_min_size", "tile_overlap_factor", "use_tiling",
    )

    def __init__(
        self,
        *,
        in_channels: int = 3,
        out_channels: int = 3,
        latent_channels: int = 16,
        block_out_channels: Sequence[int] = (128, 256, 512, 512),
        down_block_types: Sequence[str] = ("SpatialDownBlock3D",) + ("SpatialTemporalDownBlock3D",) * 3,
        up_block_types: Sequence[str] = ("SpatialUpBlock3D",) + ("SpatialTemporalUpBlock3D",) * 3,
        layers_per_block: int = 2,
        norm_num_groups: int = 32,
        act_fn: str = "silu",
        mid_block_use_attention: bool = True,
        mid_block_attention_type: str = "spatial",
        mid_block_num_attention_heads: int = 1,
        spatial_group_norm: bool = True,
        scaling_factor: float = 0.7125,
        mini_batch_encoder: int = 4,
        mini_batch_decoder: int = 1,
        tile_sample_min_size: int = 384,
        tile_overlap_factor: float = 0.25,
        use_tiling: bool = False,
    ):
        super().__init__()
        block_out_channels = list(block_out_channels)
        down_block_types, up_block_types = list(down_block_types), list(up_block_types)
        if not len(block_out_channels) == len(down_block_types) == len(up_block_types):
            raise ValueError("block_out_channels, down_block_types and up_block_types must have the same length")
        mid_kwargs = dict(use_attention=mid_block_use_attention, attention_type=mid_block_attention_type,
                          attention_heads=mid_block_num_attention_heads)
        common = dict(layers=layers_per_block, groups=norm_num_groups, act_fn=act_fn,
                      per_frame_norm=spatial_group_norm, mid_kwargs=mid_kwargs)
        self.encoder = Encoder(in_channels, latent_channels, block_out_channels, down_block_types, **common)
        self.decoder = Decoder(latent_channels, out_channels, block_out_channels, up_block_types, **common)
        self.quant_conv = nn.Conv3d(2 * latent_channels, 2 * latent_channels, kernel_size=1)
        self.post_quant_conv = nn.Conv3d(latent_channels, latent_channels, kernel_size=1)

        self.latent_channels = latent_channels
        self.scaling_factor = float(scaling_factor)
        self.spatial_compression = 2 ** (len(block_out_channels) - 1)
        # The last down block never downsamples.
        self.temporal_compression = 2 ** sum(_kind(_DOWN_KINDS, t) == "temporal" for t in down_block_types[:-1])
        if mini_batch_encoder % self.temporal_compression or mini_batch_decoder < 1:
            raise ValueError("mini_batch_encoder must be a multiple of the temporal compression; "
                             "mini_batch_decoder must be >= 1")
        self.mini_batch_encoder = mini_batch_encoder
        self.mini_batch_decoder = mini_batch_decoder
        self._set_tile_size(tile_sample_min_size, tile_overlap_factor)
        self.use_tiling = bool(use_tiling)

    @classmethod
    def from_config_dict(cls, config: dict) -> "MagvitVAE":
        """Build from a ``vae/config.json`` dict; unknown keys are ignored."""
        other_modes = ("slice_mag_vae", "slice_compression_vae", "cache_compression_vae")
        if config.get("cache_mag_vae") is False or any(config.get(k) for k in other_modes):
            raise ValueError("only the cache_mag_vae chunking of EasyAnimate V5 is supported")
        kwargs = {k: config[k] for k in cls._CONFIG_KEYS if k in config and config[k] is not None}
        # V5 derives the widths from ch * ch_mult (block_out_channels in the file agrees with it).
        if config.get("ch") is not None and config.get("ch_mult") is not None:
            kwargs["block_out_channels"] = [config["ch"] * m for m in _as_list(config["ch_mult"])]
        for key in ("block_out_channels", "down_block_types", "up_block_types"):
            if key in kwargs:
                kwargs[key] = _as_list(kwargs[key])
        kwargs["use_tiling"] = bool(config.get("use_tiling") or config.get("use_tiling_encoder")
                                    or config.get("use_tiling_decoder"))
        return cls(**kwargs)

    @property
    def dtype(self) -> torch.dtype:
        return self.quant_conv.weight.dtype

    # ---------------------------------------------------------------- tiling switches

    def enable_tiling(self, tile_sample_min_size: int = 384, tile_overlap_factor: float = 0.25) -> None:
        """Process frames larger than ``tile_sample_min_size`` pixels in overlapping, blended tiles."""
        self._set_tile_size(tile_sample_min_size, tile_overlap_factor)
        self.use_tiling = True

    def disable_tiling(self) -> None:
        self.use_tiling = False

    def _set_tile_size(self, tile_sample_min_size: int, tile_overlap_factor: float) -> None:
        if tile_sample_min_size % self.spatial_compression or tile_sample_min_size <= 0:
            raise ValueError(f"tile_sample_min_size must be a positive multiple of {self.spatial_compression}")
        if not 0.0 <= tile_overlap_factor < 1.0:
            raise ValueError("tile_overlap_factor must be in [0, 1)")
        self.tile_sample_min_size = int(tile_sample_min_size)
        self.tile_overlap_factor = float(tile_overlap_factor)

    # ---------------------------------------------------------------- public API

    def encode(self, video: torch.Tensor) -> DiagonalGaussian:
        """Encode ``[B,3,F,H,W]`` in [-1,1] (F = 1 or 4k+1) into the posterior over ``[B,16,T,H/8,W/8]``."""
        frames = video.shape[2]
        if (frames - 1) % self.temporal_compression:
            raise ValueError(f"the VAE encodes 1 or {self.temporal_compression}k+1 frames, got {frames}")
        x = video.to(self.dtype)
        try:
            if self.use_tiling and max(x.shape[-2:]) > self.tile_sample_min_size:
                c = self.spatial_compression
                if x.shape[-2] % c or x.shape[-1] % c:
                    raise ValueError(f"tiled encoding needs sizes divisible by {c}, got {tuple(x.shape[-2:])}")
                tile, stride, blend = self._latent_tile_geometry()
                moments = _tiled(x, self._encode_chunks, tile * c, stride * c, blend, stride,
                                 (x.shape[-2] // c, x.shape[-1] // c))
            else:
                moments = self._encode_chunks(x)
        finally:
            self._reset_caches()
        return DiagonalGaussian(moments)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Decode unscaled latents ``[B,16,T,h,w]`` into raw ``[B,3,1+4(T-1),8h,8w]`` (no clamp)."""
        z = latents.to(self.dtype)
        c = self.spatial_compression
        tile, stride, blend = self._latent_tile_geometry()
        try:
            if self.use_tiling and max(z.shape[-2:]) > tile:
                return _tiled(z, self._decode_chunks, tile, stride, blend * c, stride * c,
                              (z.shape[-2] * c, z.shape[-1] * c))
            return self._decode_chunks(z)
        finally:
            self._reset_caches()

    def decode_pieces(self, latents: torch.Tensor) -> Iterable[torch.Tensor]:
        """``decode`` piece by piece: raw ``[B,3,f,8h,8w]`` frames in order, one causal chunk at a time.

        Together they are exactly ``decode(latents)``, but the caller never has to hold all frames in
        the VAE's layout at once (a long video's decode then needs memory for one chunk, not the video).
        With spatial tiling in effect the tiled decode comes as a single piece.
        """
        tile = self._latent_tile_geometry()[0]
        if self.use_tiling and max(latents.shape[-2:]) > tile:
            yield self.decode(latents)
            return
        try:
            yield from self._decode_pieces(latents.to(self.dtype))
        finally:
            self._reset_caches()

    # ---------------------------------------------------------------- internals

    def _latent_tile_geometry(self) -> tuple:
        """(tile, stride, blend) in latent pixels; for 384 px / 0.25 this is the original's 48 / 36 / 12."""
        tile = self.tile_sample_min_size // self.spatial_compression
        blend = int(tile * self.tile_overlap_factor)
        return tile, tile - blend, blend

    @staticmethod
    def _chunks(length: int, size: int) -> Iterable[slice]:
        """Element 0 alone, then runs of ``size``."""
        yield slice(0, 1)
        for start in range(1, length, size):
            yield slice(start, start + size)

    def _encode_chunks(self, x: torch.Tensor) -> torch.Tensor:
        self._reset_caches()
        h = torch.cat([self.encoder(x[:, :, s]) for s in self._chunks(x.shape[2], self.mini_batch_encoder)], dim=2)
        self._reset_caches()
        return self.quant_conv(h)

    def _decode_chunks(self, z: torch.Tensor) -> torch.Tensor:
        out = torch.cat(list(self._decode_pieces(z)), dim=2)
        self._reset_caches()
        return out

    def _decode_pieces(self, z: torch.Tensor) -> Iterable[torch.Tensor]:
        """Latent 0 alone, then `mini_batch_decoder` latents at a time, the causal caches carried between."""
        self._reset_caches()
        z = self.post_quant_conv(z)
        for s in self._chunks(z.shape[2], self.mini_batch_decoder):
            yield self.decoder(z[:, :, s])

    def _reset_caches(self) -> None:
        for module in self.modules():
            if isinstance(module, (CausalConv3d, Upsampler3D)):
                module.reset_cache()

    def has_cached_state(self) -> bool:
        """True while any streaming cache holds data (only during an encode/decode call)."""
        return any(
            (isinstance(m, CausalConv3d) and m._cache is not None)
            or (isinstance(m, Upsampler3D) and m._seen_first_chunk)
            for m in self.modules()
        )
