"""Build tiny random EasyAnimate V5 model folders in the original layout, for tests that need *a* model.

Real files throughout: safetensors weights, transformers' BERT/T5 folders, a BERT vocab.txt and a
sentencepiece model trained on the spot, the published V5 scheduler config.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

IN_CHANNELS = {"t2v": 16, "inpaint": 33, "control": 32}

SCHEDULER_CONFIG = {
    "_class_name": "DDIMScheduler", "_diffusers_version": "0.31.0.dev0", "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False, "clip_sample_range": 1.0,
    "num_train_timesteps": 1000, "prediction_type": "v_prediction", "rescale_betas_zero_snr": True,
    "sample_max_value": 1.0, "set_alpha_to_one": True, "snr_shift_scale": 1.0, "steps_offset": 0,
    "timestep_spacing": "trailing", "trained_betas": None,
}

MODEL_INDEX = {
    "_class_name": "EasyAnimatePipeline_Multi_Text_Encoder", "_diffusers_version": "0.31.0.dev0",
    "scheduler": ["diffusers", "DDPMScheduler"], "text_encoder": ["transformers", "BertModel"],
    "text_encoder_2": ["transformers", "T5EncoderModel"], "tokenizer": ["transformers", "BertTokenizer"],
    "tokenizer_2": ["transformers", "T5Tokenizer"], "transformer": ["diffusers", "Transformer2DModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}

_WORDS = ("a cat dog woman man girl boy playing guitar dancing running in on the with and of sunny garden beach "
          "street city night day high quality masterpiece best camera moves slowly fast red blue white black "
          "green hair eyes clothes young old beautiful clear video shot").split()
_CJK = "一只猫狗正在弹吉他摇头年轻女子美丽清澈眼睛金发穿着白色衣服花园里跳舞质量高杰作最佳品质分辨率超精细梦幻般扭曲身体肢残缺文本字幕漫画静止丑陋错误乱码，。、"
_PUNCT = list(".,!?;:'\"()-") + [str(d) for d in range(10)]


def transformer_config(kind: str = "t2v", num_layers: int = 2, mmdit_layers: int = 2) -> dict:
    return {
        "_class_name": "EasyAnimateTransformer3DModel", "activation_fn": "gelu-approximate",
        "add_noise_in_inpaint_model": kind != "t2v", "after_norm": False, "attention_head_dim": 16,
        "enable_clip_in_inpaint": False, "enable_text_attention_mask": False, "flip_sin_to_cos": True,
        "freq_shift": 0, "in_channels": IN_CHANNELS[kind], "mmdit_layers": mmdit_layers,
        "norm_elementwise_affine": True, "norm_eps": 1e-05, "num_attention_heads": 2, "num_layers": num_layers,
        "out_channels": 16, "patch_size": 2, "resize_inpaint_mask_directly": True, "sample_height": 60,
        "sample_width": 90, "text_embed_dim": 32, "text_embed_dim_t5": 48, "time_embed_dim": 32,
        "time_position_encoding_type": "3d_rope", "timestep_activation_fn": "silu",
    }


def vae_config() -> dict:
    return {
        "_class_name": "AutoencoderKLMagvit", "act_fn": "silu", "block_out_channels": [16, 32, 48, 48],
        "cache_compression_vae": False, "cache_mag_vae": True, "ch": 16, "ch_mult": [1, 2, 3, 3],
        "down_block_types": ["SpatialDownBlock3D", "SpatialTemporalDownBlock3D", "SpatialTemporalDownBlock3D",
                             "SpatialTemporalDownBlock3D"],
        "force_upcast": True, "in_channels": 3, "latent_channels": 16, "layers_per_block": 2,
        "mid_block_attention_type": "spatial", "mid_block_num_attention_heads": 1, "mid_block_type": "MidBlock3D",
        "mid_block_use_attention": True, "mini_batch_decoder": 1, "mini_batch_encoder": 4, "norm_num_groups": 8,
        "num_attention_heads": 1, "out_channels": 3, "sample_size": 256, "scaling_factor": 0.7125,
        "slice_compression_vae": False, "slice_mag_vae": False, "spatial_group_norm": True,
        "tile_overlap_factor": 0.25, "tile_sample_min_size": 384,
        "up_block_types": ["SpatialUpBlock3D", "SpatialTemporalUpBlock3D", "SpatialTemporalUpBlock3D",
                           "SpatialTemporalUpBlock3D"],
        "upcast_vae": False, "use_tiling": False, "use_tiling_decoder": False, "use_tiling_encoder": False,
    }


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False), encoding="utf-8")


def _save_module(module: torch.nn.Module, folder: Path, config: dict) -> None:
    _write_json(folder / "config.json", config)
    state = {k: v.detach().contiguous() for k, v in module.state_dict().items()}
    save_file(state, str(folder / "diffusion_pytorch_model.safetensors"))


def _scale_weights(module: torch.nn.Module, seed: int) -> None:
    """Random weights with unit-gain fan-in scaling, so blocks matter (a plain default init nearly vanishes)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() >= 2:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) / fan_in ** 0.5)
            elif name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.02 * torch.randn(p.shape, generator=g))


def _text_encoders(root: Path, seed: int) -> None:
    import sentencepiece as spm
    from transformers import BertConfig, BertModel, BertTokenizer, T5Config, T5EncoderModel, T5Tokenizer

    torch.manual_seed(seed)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + sorted(set(_WORDS + list(_CJK) + _PUNCT))
    vocab += [c for c in "abcdefghijklmnopqrstuvwxyz"] + ["##" + c for c in "abcdefghijklmnopqrstuvwxyz"]
    tok_dir = root / "tokenizer"
    tok_dir.mkdir(parents=True, exist_ok=True)
    (tok_dir / "vocab.txt").write_text("\n".join(dict.fromkeys(vocab)) + "\n", encoding="utf-8")
    BertTokenizer(str(tok_dir / "vocab.txt"), model_max_length=77).save_pretrained(str(tok_dir))
    bert = BertModel(BertConfig(vocab_size=len(dict.fromkeys(vocab)), hidden_size=32, num_hidden_layers=2,
                                num_attention_heads=2, intermediate_size=64, max_position_embeddings=512))
    bert.save_pretrained(str(root / "text_encoder"), safe_serialization=True)

    sp_dir = root / "tokenizer_2"
    sp_dir.mkdir(parents=True, exist_ok=True)
    corpus = [" ".join(_WORDS[i:i + 7]) for i in range(len(_WORDS))] + [_CJK[i:i + 9] for i in range(len(_CJK))]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus * 4), model_prefix=str(sp_dir / "spiece"),
                                   vocab_size=150, model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                   character_coverage=1.0, hard_vocab_limit=False, minloglevel=2)
    (sp_dir / "spiece.vocab").unlink(missing_ok=True)
    _write_json(sp_dir / "tokenizer_config.json", {
        "tokenizer_class": "T5Tokenizer", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>",
        "extra_ids": 0, "additional_special_tokens": [], "legacy": True, "model_max_length": 256})
    t5_tok = T5Tokenizer.from_pretrained(str(sp_dir))
    t5 = T5EncoderModel(T5Config(vocab_size=t5_tok.vocab_size, d_model=48, d_kv=24, d_ff=96, num_layers=2,
                                 num_heads=2, feed_forward_proj="gated-gelu", tie_word_embeddings=False))
    t5.save_pretrained(str(root / "text_encoder_2"), safe_serialization=True)


def build_tiny_model(root: str | Path, kind: str = "t2v", *, num_layers: int = 2, mmdit_layers: int = 2,
                     seed: int = 0) -> Path:
    """Write a complete tiny model folder of the given kind ('t2v', 'inpaint', 'control') and return it."""
    from easyanimate_core.models.transformer import EasyAnimateTransformer3D
    from easyanimate_core.models.vae import MagvitVAE

    root = Path(root)
    torch.manual_seed(seed)
    t_cfg = transformer_config(kind, num_layers, mmdit_layers)
    transformer = EasyAnimateTransformer3D.from_config_dict(t_cfg)
    _scale_weights(transformer, seed + 1)
    _save_module(transformer, root / "transformer", t_cfg)
    vae = MagvitVAE.from_config_dict(vae_config())
    _scale_weights(vae, seed + 2)
    _save_module(vae, root / "vae", vae_config())
    _text_encoders(root, seed + 3)
    _write_json(root / "scheduler" / "scheduler_config.json", SCHEDULER_CONFIG)
    _write_json(root / "model_index.json", MODEL_INDEX)
    return root


def random_transformer(num_layers: int = 3, mmdit_layers: int = 2, seed: int = 0):
    """A tiny random T2V transformer in eval mode, matrices scaled by 1/sqrt(fan_in) so every block matters."""
    from easyanimate_core.models.transformer import EasyAnimateTransformer3D

    torch.manual_seed(seed)
    model = EasyAnimateTransformer3D.from_config_dict(transformer_config("t2v", num_layers=num_layers,
                                                                         mmdit_layers=mmdit_layers))
    with torch.no_grad():
        for p in model.parameters():
            p.requires_grad_(False)
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape) / p[0].numel() ** 0.5)
    return model.eval()
