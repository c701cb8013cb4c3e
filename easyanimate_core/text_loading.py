"""Loading the text encoders and tokenizers of a model folder strictly, so a damaged or mixed-up file is an
error naming it: tokenizers are tried on a prompt at load time, and encoder weights must match their config
exactly (transformers would fill any gap with random weights and the videos would be silent garbage).
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch
import transformers
from transformers import BertTokenizer, T5Tokenizer

from .errors import CheckpointError


def dtype_kwarg(dtype: torch.dtype) -> dict:
    major = int(transformers.__version__.split(".")[0])
    return {"dtype": dtype} if major >= 5 else {"torch_dtype": dtype}


def _from_pretrained(cls, folder: Path, **kwargs):
    try:
        return cls.from_pretrained(str(folder), local_files_only=True, **kwargs)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot load {cls.__name__} from {folder}: {exc}") from exc


# Tensors that do not change the prompt embeddings, so a checkpoint may lack them (the BERT pooler is never
# used) or carry them (heads and a decoder saved with the encoder).
_OPTIONAL_MISSING = {"bert": ("pooler.",), "t5": ()}
_OPTIONAL_UNEXPECTED = {"bert": ("cls.", "pooler."), "t5": ("decoder.", "lm_head.")}
_FAMILIES = {"bert": ("bert",), "t5": ("t5", "mt5", "umt5")}
_LABELS = {"bert": "the BERT text encoder (text_encoder/)", "t5": "the mT5 text encoder (text_encoder_2/)"}


def _weights_file(folder: Path) -> Path:
    for name in ("model.safetensors", "model.safetensors.index.json"):
        if (folder / name).is_file():
            return folder / name
    return folder


def _looks_like(keys) -> str:
    keys = list(keys)
    if any(k.startswith(("encoder.layer.", "embeddings.", "bert.")) for k in keys):
        return " They look like BERT weights (text_encoder/ and text_encoder_2/ may be mixed up)."
    if any(k.startswith(("encoder.block.", "shared.", "decoder.")) for k in keys):
        return " They look like T5 weights (text_encoder/ and text_encoder_2/ may be mixed up)."
    return ""


def load_text_encoder(cls, folder: Path, family: str, **kwargs):
    """Load a transformers encoder strictly: a config of another family, or any missing or unexpected
    weight, raises CheckpointError naming the file (transformers would fill the gaps with random weights)."""
    model_type = (_read_config(folder / "config.json").get("model_type") or "").lower()
    for other, types in _FAMILIES.items():
        if other != family and model_type in types:
            raise CheckpointError(
                f"{folder / 'config.json'} describes a {model_type!r} model, but this folder must hold "
                f"{_LABELS[family]}: text_encoder/ and text_encoder_2/ look mixed up. Download both folders again.")
    model, info = _from_pretrained(cls, folder, output_loading_info=True, use_safetensors=True, **kwargs)
    missing = [k for k in info.get("missing_keys", ()) if not k.startswith(_OPTIONAL_MISSING[family])]
    unexpected = sorted(k for k in info.get("unexpected_keys", ()) if not k.startswith(_OPTIONAL_UNEXPECTED[family]))
    mismatched = list(info.get("mismatched_keys", ()))
    if missing or unexpected or mismatched:
        parts = [f"{len(v)} {what} tensors, e.g. {sorted(map(str, v))[:3]}" for what, v in
                 (("missing", missing), ("unexpected", unexpected), ("wrongly shaped", mismatched)) if v]
        raise CheckpointError(
            f"{_weights_file(folder)} does not hold the weights {folder / 'config.json'} describes for "
            f"{_LABELS[family]}: {'; '.join(parts)}.{_looks_like(unexpected)} Loading it anyway would fill the gaps "
            f"with random weights and make garbage videos. Download this folder again.")
    return model


def _read_config(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc}); download it again.") from exc
    return data if isinstance(data, dict) else {}


_PROBE = "a cat 一只猫 \u2603"  # the snowman is in no vocabulary: it exercises the unknown-word token


def check_bert_vocab(vocab_file: Path, unk_token: str = "[UNK]") -> None:
    """vocab.txt must list tokens, the unknown-word token among them (the tokenizer loads without it and
    fails on the first unknown word: 'WordPiece error: Missing [UNK] token')."""
    try:
        tokens = {line.rstrip("\r\n") for line in vocab_file.read_text(encoding="utf-8").splitlines()}
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"cannot read {vocab_file} ({exc}); download it again.") from exc
    tokens.discard("")
    if not tokens:
        raise CheckpointError(f"{vocab_file} lists no tokens: the file is damaged. Download it again.")
    if unk_token not in tokens:
        raise CheckpointError(f"{vocab_file} has no unknown-word token {unk_token!r} among its {len(tokens)} tokens: "
                              "it is not a BERT vocabulary, or it is damaged. Download it again.")


def check_tokenizer(tokenizer, vocab_file: Path) -> None:
    """Refuse a tokenizer that loaded but cannot work: an empty vocabulary, no unknown token, or a
    failure on a short bilingual prompt (so Text Encode never fails later with a bare library error)."""
    vocab = tokenizer.get_vocab()
    if not vocab:
        raise CheckpointError(f"{vocab_file} has an empty vocabulary: the file is damaged. Download it again.")
    unk = tokenizer.unk_token
    if unk is None or unk not in vocab:
        raise CheckpointError(f"{vocab_file} has no unknown-word token {unk!r} among its {len(vocab)} entries: it is "
                              "not this tokenizer's vocabulary file, or it is damaged. Download it again.")
    try:
        ids = tokenizer(_PROBE).input_ids
    except Exception as exc:  # noqa: BLE001 - any library failure here means an unusable file
        raise CheckpointError(f"{vocab_file} cannot tokenize a prompt ({type(exc).__name__}: {exc}); the file is "
                              "damaged or belongs to another tokenizer. Download it again.") from exc
    if not ids:
        raise CheckpointError(f"{vocab_file} turns a prompt into no tokens; download it again.")


def _load_t5_tokenizer(folder: Path):
    try:
        return _from_pretrained(T5Tokenizer, folder)
    except CheckpointError as exc:
        missing = [name for name in ("sentencepiece", "google") if importlib.util.find_spec(name) is None]
        if missing:
            raise CheckpointError(f"{exc}\nReading spiece.model needs the `sentencepiece` and `protobuf` packages "
                                  "(pip install sentencepiece protobuf).") from exc
        # The library's own advice (install tiktoken...) is wrong here: the packages are there, the file is bad.
        raise CheckpointError(f"{folder / 'spiece.model'} could not be read as a sentencepiece model although "
                              "sentencepiece and protobuf are installed: the file is damaged or not an mT5 "
                              "tokenizer. Download it again.") from exc


def load_tokenizers(root: Path):
    """(BERT tokenizer, mT5 tokenizer) of a model folder, each checked to work (see check_tokenizer)."""
    root = Path(root)
    bert_tok = _from_pretrained(BertTokenizer, root / "tokenizer")
    check_bert_vocab(root / "tokenizer" / "vocab.txt", bert_tok.unk_token or "[UNK]")
    check_tokenizer(bert_tok, root / "tokenizer" / "vocab.txt")
    t5_tok = _load_t5_tokenizer(root / "tokenizer_2")
    check_tokenizer(t5_tok, root / "tokenizer_2" / "spiece.model")
    return bert_tok, t5_tok
