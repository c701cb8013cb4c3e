"""EasyAnimate V5 MMDiT transformer (plain PyTorch, state-dict names of the published checkpoints)."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules import module as _module_internals

from ..attention import DEFAULT_BACKEND, sdpa_attention
from .rope import RopeTables, apply_rope, apply_rope_into, build_3d_rope, rope_tables

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


_is_compiling = getattr(torch.compiler, "is_compiling", None) or (lambda: False)  # torch < 2.3: no compile support


def _fast_inference() -> bool:
    """Whether eager in-place / out= paths may be used: no autograd recording and not being traced by
    torch.compile (which fuses the plain formulas itself)."""
    return not torch.is_grad_enabled() and not _is_compiling()


def _may_overwrite_output(module: nn.Module) -> bool:
    """Whether a fresh output of `module` may be overwritten in place: no forward hook could have kept it.

    A hook that returns its output updated in place and keeps no reference to it can say so with a
    function attribute `inplace_safe = True`.
    """
    hooks = list(module._forward_hooks.values()) + list(_module_internals._global_forward_hooks.values())
    return all(getattr(hook, "inplace_safe", False) for hook in hooks)


def _plain_linear(module: nn.Module) -> bool:
    """An nn.Linear itself (not a subclass such as Fp8Linear), with no hooks and no replaced forward
    (accelerate-style offload wrappers): calling it does F.linear(x, weight, bias) and nothing else."""
    return (type(module) is nn.Linear and "forward" not in module.__dict__
            and not module._forward_hooks and not module._forward_pre_hooks
            and not _module_internals._global_forward_hooks and not _module_internals._global_forward_pre_hooks)


def _onednn_linear_gelu_probe() -> bool:
    try:
        x, w, b = torch.ones(2, 4), torch.ones(3, 4), torch.zeros(3)
        out = torch.ops.mkldnn._linear_pointwise(x, w, b, "gelu", [], "tanh")
        return torch.allclose(out, F.gelu(F.linear(x, w, b), approximate="tanh"))
    except (AttributeError, RuntimeError, NotImplementedError, TypeError):  # no oneDNN, or the op changed
        return False


_ONEDNN_LINEAR_GELU: list[bool] = []  # probed on first use


def _onednn_linear_gelu_ok(linear: nn.Module, x: Tensor) -> bool:
    """Whether gelu_tanh(linear(x)) may run as one oneDNN matmul with bias and GELU in its epilogue:
    CPU float32 eager inference through a plain, hook-free nn.Linear."""
    if x.device.type != "cpu" or x.dtype != torch.float32 or not _plain_linear(linear):
        return False
    bias = linear.bias
    if linear.weight.device != x.device or linear.weight.dtype != torch.float32 or (
            bias is not None and bias.dtype != torch.float32):
        return False
    if not _ONEDNN_LINEAR_GELU:
        _ONEDNN_LINEAR_GELU.append(_onednn_linear_gelu_probe())
    return _ONEDNN_LINEAR_GELU[0]


def _modulate(y: Tensor, shift: Tensor, scale: Tensor, inplace: bool) -> Tensor:
    """y * (1 + scale) + shift in one pass; overwrites y (a fresh LayerNorm output) when `inplace`."""
    if inplace:
        return torch.addcmul(shift, y, 1 + scale, out=y)
    return torch.addcmul(shift, y, 1 + scale)


class FP32LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 whatever the input/weight dtype, result in the input dtype."""

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == torch.float32 and (self.weight is None or self.weight.dtype == torch.float32):
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
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
        inplace = _fast_inference() and _may_overwrite_output(self.norm)
        x = _modulate(self.norm(x), shift, scale, inplace)
        ctx = _modulate(self.norm(ctx), c_shift, c_scale, inplace)
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

    def joint_qkv(self, x: Tensor, text: tuple[Tensor, Tensor, Tensor], rope: RopeTables):
        """[text ; video] q, k, v shaped [B, heads, Lt + Lv, head_dim], this module projecting the video x.

        Eager inference path: each joint tensor is allocated once and filled in place, the rotated video
        q/k written straight into it (no rotated copy, no concatenation). Memory order: [B, L, heads, d],
        the projections' own order (so SDPA gets transposed views, as before; FlashAttention's native
        layout), except k and v on the CPU, which are stored [B, heads, L, d]: PyTorch's CPU flash kernel
        runs about 8 % faster with k/v in that order, while q stays in token order because the kernel's
        output follows q's order and the output projection then reads it without a copy.
        """
        joint = []
        for i, (proj, norm) in enumerate(((self.to_q, self.norm_q), (self.to_k, self.norm_k), (self.to_v, None))):
            y = proj(x).unflatten(-1, (self.heads, -1))  # [B, Lv, heads, d]
            if norm is not None:
                y = norm(y)
            head = text[i]
            batch, text_len, heads, dim = head.shape
            shape = (batch, text_len + y.shape[1], heads, dim)
            if i > 0 and y.device.type == "cpu":  # k, v
                out = y.new_empty(batch, heads, shape[1], dim).transpose(1, 2)
            else:
                out = y.new_empty(shape)
            out[:, :text_len] = head
            if norm is not None:
                apply_rope_into(out[:, text_len:], y, rope)
            else:
                out[:, text_len:] = y
            joint.append(out.transpose(1, 2))
        return joint


class GeluProjection(nn.Module):
    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out)

    def forward(self, x: Tensor) -> Tensor:
        if not _fast_inference():
            return F.gelu(self.proj(x), approximate="tanh")
        if _onednn_linear_gelu_ok(self.proj, x):
            # Bias and GELU applied in the matmul's epilogue: no pass over the [tokens, 4 * dim] result.
            return torch.ops.mkldnn._linear_pointwise(x, self.proj.weight, self.proj.bias, "gelu", [], "tanh")
        h = self.proj(x)
        if _may_overwrite_output(self.proj):
            return torch.ops.aten.gelu_(h, approximate="tanh")  # the [tokens, 4 * dim] tensor: no second one
        return F.gelu(h, approximate="tanh")


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
        # q, k, v [B, heads, L, d] -> [B, heads, L, d]; set by attention.set_attention_backend.
        self.attention_fn = sdpa_attention

    def forward(self, x: Tensor, ctx: Tensor, temb: Tensor, rope: RopeTables) -> tuple[Tensor, Tensor]:
        attn_txt = self.attn2 if self.attn2 is not None else self.attn1
        ff_txt = self.txt_ff if self.txt_ff is not None else self.ff
        text_len = ctx.shape[1]

        norm_x, norm_ctx, gate, ctx_gate = self.norm1(x, ctx, temb)
        text_qkv = attn_txt.qkv(norm_ctx)
        if _fast_inference():
            q, k, v = self.attn1.joint_qkv(norm_x, text_qkv, rope)
        else:  # plain formulas, for autograd and for torch.compile to fuse; same memory layouts as joint_qkv
            video_qkv = self.attn1.qkv(norm_x, (rope.cos, rope.sin))
            q, k, v = (torch.cat(pair, dim=1).transpose(1, 2) for pair in zip(text_qkv, video_qkv))
            if q.device.type == "cpu":
                k, v = k.contiguous(), v.contiguous()
        # One joint attention over [text ; video], text first, no mask; [B, heads, L, d] in and out.
        out = self.attention_fn(q, k, v).transpose(1, 2).flatten(2)
        x = torch.addcmul(x, gate, self.attn1.to_out[0](out[:, text_len:]))
        ctx = torch.addcmul(ctx, ctx_gate, attn_txt.to_out[0](out[:, :text_len]))

        norm_x, norm_ctx, gate, ctx_gate = self.norm2(x, ctx, temb)
        x = torch.addcmul(x, gate, self.ff(norm_x))
        ctx = torch.addcmul(ctx, ctx_gate, ff_txt(norm_ctx))
        return x, ctx


class OutputNorm(nn.Module):
    """AdaLayerNorm: LayerNorm, then shift/scale (in that order) from one Linear on SiLU(temb)."""

    def __init__(self, temb_dim: int, dim: int, eps: float, affine: bool):
        super().__init__()
        self.linear = nn.Linear(temb_dim, 2 * dim)
        self.norm = FP32LayerNorm(dim, eps=eps, elementwise_affine=affine)

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        shift, scale = self.linear(F.silu(temb))[:, None, :].chunk(2, dim=-1)
        return _modulate(self.norm(x), shift, scale, _fast_inference() and _may_overwrite_output(self.norm))


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
        self._rope_cache: dict[tuple, RopeTables] = {}
        self.attention_backend = DEFAULT_BACKEND  # see attention.set_attention_backend
        # The one seam around the block stack: None runs `run_blocks`; otherwise a callable
        # runner(transformer, x, ctx, temb, rope) -> x that replaces it for a while (a step cache that
        # may reuse the last residual, a sequence-parallel split...). It must call
        # transformer.run_blocks (or the blocks) for whatever it does compute, so hooks/LoRA/swap apply.
        self.blocks_runner = None

    def run_blocks(self, x: Tensor, ctx: Tensor, temb: Tensor, rope: RopeTables) -> Tensor:
        """The block stack: video tokens x [B, Lv, D] and text tokens ctx [B, Lt, D] -> video tokens."""
        for block in self.transformer_blocks:
            x, ctx = block(x, ctx, temb, rope)
        return x

    @classmethod
    def from_config_dict(cls, config: dict) -> "EasyAnimateTransformer3D":
        return cls(TransformerConfig.from_dict(config))

    @property
    def compute_dtype(self) -> torch.dtype:
        """Activation dtype: the weights' dtype (bf16 for 1-byte storage dtypes such as float8)."""
        dtype = self.proj.weight.dtype
        return torch.bfloat16 if dtype.itemsize == 1 else dtype

    def rope(self, num_frames: int, grid_h: int, grid_w: int, device: torch.device) -> RopeTables:
        """RoPE tables for one latent geometry, built once per (geometry, device) and cached.

        A (cos, sin, rotation) named tuple: pass it (or just its cos, sin) as `image_rotary_emb`.
        """
        key = (num_frames, grid_h, grid_w, torch.device(device), torch.float32)
        if key not in self._rope_cache:
            with torch.inference_mode(False):  # plain tensors, usable later with autograd too
                cos, sin = build_3d_rope(
                    num_frames, grid_h, grid_w, self.config.attention_head_dim, device=device, dtype=torch.float32
                )
                self._rope_cache[key] = rope_tables(cos, sin)
        return self._rope_cache[key]

    def forward(
        self,
        hidden_states: Tensor,
        timestep: Tensor,
        encoder_hidden_states: Tensor,
        encoder_hidden_states_t5: Tensor | None = None,
        inpaint_latents: Tensor | None = None,
        control_latents: Tensor | None = None,
        image_rotary_emb: tuple[Tensor, Tensor] | RopeTables | None = None,
    ) -> Tensor:
        batch, _, frames, height, width = hidden_states.shape
        p, dtype, device = self.config.patch_size, self.compute_dtype, hidden_states.device
        grid_h, grid_w = height // p, width // p
        if image_rotary_emb is None:
            rope = self.rope(frames, grid_h, grid_w, device)
        elif isinstance(image_rotary_emb, RopeTables) and image_rotary_emb.cos.device == device:
            rope = image_rotary_emb
        else:  # plain (cos, sin), or tables of another device: the complex form is derived per call (small)
            rope = rope_tables(*(t.to(device) for t in image_rotary_emb[:2]))

        timestep = torch.as_tensor(timestep, device=device).reshape(-1).expand(batch)
        t_freq = timestep_sinusoid(timestep, self.config.inner_dim, self.config.flip_sin_to_cos, self.config.freq_shift)
        temb = self.time_embedding(t_freq.to(dtype))

        parts = [t for t in (hidden_states, inpaint_latents, control_latents) if t is not None]
        x = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
        x = self.proj(x.to(dtype).transpose(1, 2).flatten(0, 1))  # per frame: [B*T, D, gh, gw]
        x = x.unflatten(0, (batch, frames)).permute(0, 1, 3, 4, 2).flatten(1, 3)  # [B, T*gh*gw, D]

        ctx = self.text_proj(encoder_hidden_states.to(dtype))
        if encoder_hidden_states_t5 is not None:
            ctx = torch.cat([ctx, self.text_proj_t5(encoder_hidden_states_t5.to(dtype))], dim=1)

        runner = self.blocks_runner
        x = self.run_blocks(x, ctx, temb, rope) if runner is None else runner(self, x, ctx, temb, rope)

        # The reference normalises [text ; video] and drops the text; LayerNorm is per token.
        x = self.proj_out(self.norm_out(self.norm_final(x), temb))
        x = x.reshape(batch, frames, grid_h, grid_w, -1, p, p)  # channels ordered (c, p_h, p_w)
        return x.permute(0, 4, 1, 2, 5, 3, 6).reshape(batch, -1, frames, height, width)


def compile_transformer_blocks(transformer: EasyAnimateTransformer3D, mode: str | None = None, **options) -> None:
    """torch.compile every transformer block in place (nn.Module.compile: state-dict names unchanged).

    Compilation happens at the first forward, and again for each new latent geometry (dynamic=False:
    shapes are baked in, so a new resolution or frame count recompiles). MMDiT and shared-weight blocks
    compile separately; all blocks of one kind share a graph. Under torch.compile the blocks run their
    plain functional formulas, which inductor fuses. `mode` and `options` go to torch.compile.

    Two process-wide torch._dynamo settings are changed, because the defaults would give wrong or
    eager results here:
    - skip_nnmodule_hook_guards = False: by default dynamo assumes no forward hook is added or removed
      after compiling, so a LoRA set afterwards (lora.set_loras adds hooks to the Linears) would be
      silently ignored. With hook guards, adding or removing LoRAs recompiles once per (geometry,
      LoRA layer set); changing only their strengths or files of the same ranks does not.
    - recompile_limit raised to at least 64 (default 8): each geometry x LoRA state x block kind is
      one cache entry, and past the limit dynamo falls back to eager.
    The attention backend is part of the trace: set_attention_backend afterwards recompiles.
    """
    import torch._dynamo

    dynamo_config = torch._dynamo.config
    dynamo_config.skip_nnmodule_hook_guards = False
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo_config, name):
            setattr(dynamo_config, name, max(getattr(dynamo_config, name), 64))
            break
    for block in transformer.transformer_blocks:
        block.compile(dynamic=False, mode=mode, **options)
