"""EasyAnimate V5 MMDiT transformer (plain PyTorch, state-dict names of the published checkpoints)."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .rope import apply_rope, build_3d_rope

# The original V5 loader forces these on top of transformer/config.json.
V5_CONFIG_OVERRIDES = {
    "enable_text_attention_mask": False,
    "resize_inpaint_mask_directly": True,
    "enable_clip_in_inpaint": False,
}

# The RoPE base box is 480x720 pixels: 30x45 tokens with VAE stride 8 and patch 2.
ROPE_BASE_PIXELS = (480, 720)
VAE_SPATIAL_STRIDE = 8


@dataclass(frozen=True)
class TransformerConfig:
    """The transformer/config.json fields this implementation reads (defaults: 12B)."""

    in_channels: int = 16
    out_channels: int = 16
    patch_size: int = 2
    num_attention_heads: int = 48
    attention_head_dim: int = 64
    num_layers: int = 48
    mmdit_layers: int = 48
    time_embed_dim: int = 512
    text_embed_dim: int = 1024
    text_embed_dim_t5: int | None = 2048
    norm_eps: float = 1e-5
    norm_elementwise_affine: bool = True
    flip_sin_to_cos: bool = True
    freq_shift: float = 0
    activation_fn: str = "gelu-approximate"
    timestep_activation_fn: str = "silu"
    time_position_encoding_type: str = "3d_rope"
    after_norm: bool = False
    add_norm_text_encoder: bool = False
    add_noise_in_inpaint_model: bool = False
    enable_text_attention_mask: bool = False
    resize_inpaint_mask_directly: bool = True
    enable_clip_in_inpaint: bool = False

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @classmethod
    def from_dict(cls, config: dict) -> "TransformerConfig":
        """Known keys of a config.json dict plus the V5 overrides; unknown keys are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in config.items() if k in names}
        values.update(V5_CONFIG_OVERRIDES)
        cfg = cls(**values)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        required = {
            "activation_fn": (self.activation_fn, "gelu-approximate"),
            "timestep_activation_fn": (self.timestep_activation_fn, "silu"),
            "time_position_encoding_type": (self.time_position_encoding_type, "3d_rope"),
            "after_norm": (self.after_norm, False),
            "add_norm_text_encoder": (self.add_norm_text_encoder, False),
        }
        for name, (value, expected) in required.items():
            if value != expected:
                raise ValueError(f"EasyAnimate V5 transformer: {name}={value!r} is not supported (expected {expected!r})")


class FP32LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 whatever the input/weight dtype, result in the input dtype."""

    def forward(self, x: Tensor) -> Tensor:
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).to(x.dtype)


def timestep_sinusoid(timestep: Tensor, dim: int, flip_sin_to_cos: bool = True, shift: float = 0.0) -> Tensor:
    """Sinusoidal embedding [B, dim] of raw (0..999) timesteps, in float32."""
    half = dim // 2
    exponent = -math.log(10000) * torch.arange(half, dtype=torch.float32, device=timestep.device) / (half - shift)
    angles = timestep.float()[:, None] * torch.exp(exponent)[None, :]
    sin, cos = torch.sin(angles), torch.cos(angles)
    return torch.cat([cos, sin] if flip_sin_to_cos else [sin, cos], dim=-1)


class TimestepEmbedding(nn.Module):
    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, out_dim)
        self.linear_2 = nn.Linear(out_dim, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class LayerNormZero(nn.Module):
    """Shared LayerNorm with separate shift/scale/gate for video and text, from one Linear on SiLU(temb)."""

    def __init__(self, temb_dim: int, dim: int, eps: float, affine: bool):
        super().__init__()
        self.linear = nn.Linear(temb_dim, 6 * dim)
        self.norm = FP32LayerNorm(dim, eps=eps, elementwise_affine=affine)

    def forward(self, x: Tensor, ctx: Tensor, temb: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        shift, scale, gate, c_shift, c_scale, c_gate = self.linear(F.silu(temb))[:, None, :].chunk(6, dim=-1)
        x = self.norm(x) * (1 + scale) + shift
        ctx = self.norm(ctx) * (1 + c_scale) + c_shift
        return x, ctx, gate, c_gate


class StreamAttention(nn.Module):
    """q/k/v/out projections of one token stream with per-head LayerNorm on q and k."""

    def __init__(self, dim: int, heads: int, head_dim: int):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(dim, dim)
        self.to_v = nn.Linear(dim, dim)
        self.norm_q = FP32LayerNorm(head_dim, eps=1e-6)
        self.norm_k = FP32LayerNorm(head_dim, eps=1e-6)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim), nn.Identity()])  # [1] was dropout

    def qkv(self, x: Tensor, rope: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """q, k, v as [B, L, heads, head_dim]; RoPE after the qk-norm."""
        q = self.norm_q(self.to_q(x).unflatten(-1, (self.heads, -1)))
        k = self.norm_k(self.to_k(x).unflatten(-1, (self.heads, -1)))
        v = self.to_v(x).unflatten(-1, (self.heads, -1))
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        return q, k, v


class GeluProjection(nn.Module):
    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out)

    def forward(self, x: Tensor) -> Tensor:
        return F.gelu(self.proj(x), approximate="tanh")


class FeedForward(nn.Module):
    def __init__(self, dim: int, inner_dim: int):
        super().__init__()
        # Slot 1 held a dropout in the reference: keeps the `net.2` key.
        self.net = nn.Sequential(GeluProjection(dim, inner_dim), nn.Identity(), nn.Linear(inner_dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class TransformerBlock(nn.Module):
    """Joint [text ; video] attention block. MMDiT blocks have text weights (attn2, txt_ff); others share."""

    def __init__(self, cfg: TransformerConfig, mmdit: bool):
        super().__init__()
        dim, heads, head_dim = cfg.inner_dim, cfg.num_attention_heads, cfg.attention_head_dim
        self.norm1 = LayerNormZero(cfg.time_embed_dim, dim, cfg.norm_eps, cfg.norm_elementwise_affine)
        self.attn1 = StreamAttention(dim, heads, head_dim)
        self.attn2 = StreamAttention(dim, heads, head_dim) if mmdit else None
        self.norm2 = LayerNormZero(cfg.time_embed_dim, dim, cfg.norm_eps, cfg.norm_elementwise_affine)
        self.ff = FeedForward(dim, 4 * dim)
        self.txt_ff = FeedForward(dim, 4 * dim) if mmdit else None

    def forward(self, x: Tensor, ctx: Tensor, temb: Tensor, rope: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        attn_txt = self.attn2 if self.attn2 is not None else self.attn1
        ff_txt = self.txt_ff if self.txt_ff is not None else self.ff
        text_len = ctx.shape[1]

        norm_x, norm_ctx, gate, ctx_gate = self.norm1(x, ctx, temb)
        q_v, k_v, v_v = self.attn1.qkv(norm_x, rope)
        q_t, k_t, v_t = attn_txt.qkv(norm_ctx)
        # [B, L, heads, d] -> [B, heads, L, d]; text first, no mask.
        q, k, v = (torch.cat(pair, dim=1).transpose(1, 2) for pair in ((q_t, q_v), (k_t, k_v), (v_t, v_v)))
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
        x = x + gate * self.attn1.to_out[0](out[:, text_len:])
        ctx = ctx + ctx_gate * attn_txt.to_out[0](out[:, :text_len])

        norm_x, norm_ctx, gate, ctx_gate = self.norm2(x, ctx, temb)
        x = x + gate * self.ff(norm_x)
        ctx = ctx + ctx_gate * ff_txt(norm_ctx)
        return x, ctx


class OutputNorm(nn.Module):
    """AdaLayerNorm: LayerNorm, then shift/scale (in that order) from one Linear on SiLU(temb)."""

    def __init__(self, temb_dim: int, dim: int, eps: float, affine: bool):
        super().__init__()
        self.linear = nn.Linear(temb_dim, 2 * dim)
        self.norm = FP32LayerNorm(dim, eps=eps, elementwise_affine=affine)

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        shift, scale = self.linear(F.silu(temb))[:, None, :].chunk(2, dim=-1)
        return self.norm(x) * (1 + scale) + shift


class EasyAnimateTransformer3D(nn.Module):
    """EasyAnimate V5 transformer: [B,16,T,h,w] latents (+ inpaint/control channels) -> v-prediction."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        config.validate()
        self.config = config
        dim, p = config.inner_dim, config.patch_size
        self.time_embedding = TimestepEmbedding(dim, config.time_embed_dim)
        self.proj = nn.Conv2d(config.in_channels, dim, kernel_size=p, stride=p)
        self.text_proj = nn.Linear(config.text_embed_dim, dim)
        self.text_proj_t5 = nn.Linear(config.text_embed_dim_t5, dim) if config.text_embed_dim_t5 else None
        self.transformer_blocks = nn.ModuleList(
            TransformerBlock(config, mmdit=i < config.mmdit_layers) for i in range(config.num_layers)
        )
        self.norm_final = FP32LayerNorm(dim, eps=config.norm_eps, elementwise_affine=config.norm_elementwise_affine)
        self.norm_out = OutputNorm(config.time_embed_dim, dim, config.norm_eps, config.norm_elementwise_affine)
        self.proj_out = nn.Linear(dim, p * p * config.out_channels)
        self._rope_cache: dict[tuple, tuple[Tensor, Tensor]] = {}

    @classmethod
    def from_config_dict(cls, config: dict) -> "EasyAnimateTransformer3D":
        return cls(TransformerConfig.from_dict(config))

    @property
    def compute_dtype(self) -> torch.dtype:
        """Activation dtype: the weights' dtype (bf16 for 1-byte storage dtypes such as float8)."""
        dtype = self.proj.weight.dtype
        return torch.bfloat16 if dtype.itemsize == 1 else dtype

    def rope(self, num_frames: int, grid_h: int, grid_w: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """Cached float32 RoPE tables for one latent geometry."""
        key = (num_frames, grid_h, grid_w, device, torch.float32)
        if key not in self._rope_cache:
            self._rope_cache[key] = build_3d_rope(
                num_frames, grid_h, grid_w, self.config.attention_head_dim, device=device, dtype=torch.float32
            )
        return self._rope_cache[key]

    def forward(
        self,
        hidden_states: Tensor,
        timestep: Tensor,
        encoder_hidden_states: Tensor,
        encoder_hidden_states_t5: Tensor | None = None,
        inpaint_latents: Tensor | None = None,
        control_latents: Tensor | None = None,
        image_rotary_emb: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor:
        batch, _, frames, height, width = hidden_states.shape
        p, dtype, device = self.config.patch_size, self.compute_dtype, hidden_states.device
        grid_h, grid_w = height // p, width // p
        if image_rotary_emb is None:
            image_rotary_emb = self.rope(frames, grid_h, grid_w, device)
        else:
            image_rotary_emb = tuple(t.to(device) for t in image_rotary_emb)

        timestep = torch.as_tensor(timestep, device=device).reshape(-1).expand(batch)
        t_freq = timestep_sinusoid(timestep, self.config.inner_dim, self.config.flip_sin_to_cos, self.config.freq_shift)
        temb = self.time_embedding(t_freq.to(dtype))

        x = torch.cat([t for t in (hidden_states, inpaint_latents, control_latents) if t is not None], dim=1)
        x = self.proj(x.to(dtype).transpose(1, 2).flatten(0, 1))  # per frame: [B*T, D, gh, gw]
        x = x.unflatten(0, (batch, frames)).permute(0, 1, 3, 4, 2).flatten(1, 3)  # [B, T*gh*gw, D]

        ctx = self.text_proj(encoder_hidden_states.to(dtype))
        if encoder_hidden_states_t5 is not None:
            ctx = torch.cat([ctx, self.text_proj_t5(encoder_hidden_states_t5.to(dtype))], dim=1)

        for block in self.transformer_blocks:
            x, ctx = block(x, ctx, temb, image_rotary_emb)

        # The reference normalises [text ; video] and drops the text; LayerNorm is per token.
        x = self.proj_out(self.norm_out(self.norm_final(x), temb))
        x = x.reshape(batch, frames, grid_h, grid_w, -1, p, p)  # channels ordered (c, p_h, p_w)
        return x.permute(0, 4, 1, 2, 5, 3, 6).reshape(batch, -1, frames, height, width)
