"""BERT + mT5 prompt encoding, the V5 way: padded to max length, truncated, no attention mask."""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import BertModel, T5EncoderModel

from .text_loading import dtype_kwarg, load_text_encoder, load_tokenizers

MAX_TEXT_TOKENS = 256


@dataclass
class PromptEmbeds:
    """Text states for the transformer: `bert` [B,77,Dbert] and `t5` [B,256,Dt5]."""

    bert: torch.Tensor
    t5: torch.Tensor

    def to(self, device=None, dtype=None) -> "PromptEmbeds":
        return PromptEmbeds(self.bert.to(device=device, dtype=dtype), self.t5.to(device=device, dtype=dtype))

    @staticmethod
    def cat(items: list["PromptEmbeds"]) -> "PromptEmbeds":
        return PromptEmbeds(torch.cat([i.bert for i in items]), torch.cat([i.t5 for i in items]))

    def repeat(self, n: int) -> "PromptEmbeds":
        return PromptEmbeds(self.bert.repeat(n, 1, 1), self.t5.repeat(n, 1, 1))


class TextEncoders:
    """The two V5 text encoders with their tokenizers."""

    def __init__(self, bert: BertModel, bert_tokenizer, t5: T5EncoderModel, t5_tokenizer):
        self.bert, self.bert_tokenizer = bert.eval(), bert_tokenizer
        self.t5, self.t5_tokenizer = t5.eval(), t5_tokenizer

    @classmethod
    def from_model_dir(cls, root: Path, *, dtype: torch.dtype, device="cpu") -> "TextEncoders":
        """Load `text_encoder/`, `tokenizer/`, `text_encoder_2/`, `tokenizer_2/` from a model folder.

        Tokenizers are checked first (cheap), then each encoder is loaded strictly (see load_text_encoder).
        """
        bert_tok, t5_tok = load_tokenizers(root)
        kw = dtype_kwarg(dtype)
        bert = load_text_encoder(BertModel, root / "text_encoder", "bert", **kw)
        t5 = load_text_encoder(T5EncoderModel, root / "text_encoder_2", "t5", **kw)
        return cls(bert.to(device), bert_tok, t5.to(device), t5_tok)

    @property
    def device(self) -> torch.device:
        return next(self.bert.parameters()).device

    def to(self, device) -> "TextEncoders":
        self.bert.to(device)
        self.t5.to(device)
        return self

    @staticmethod
    def _tokenize(tokenizer, prompts: list[str]) -> torch.Tensor:
        max_length = min(tokenizer.model_max_length, MAX_TEXT_TOKENS)
        ids = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True,
                        return_tensors="pt").input_ids
        return ids

    @torch.inference_mode()
    def encode(self, prompts: list[str] | str) -> PromptEmbeds:
        """Encode prompts (one row each); padding tokens are attended to, as V5 was trained."""
        if isinstance(prompts, str):
            prompts = [prompts]
        self._warn_if_truncated(prompts)
        device = self.device
        bert_ids = self._tokenize(self.bert_tokenizer, prompts).to(device)
        t5_ids = self._tokenize(self.t5_tokenizer, prompts).to(device)
        bert_states = self.bert(input_ids=bert_ids).last_hidden_state
        t5_states = self.t5(input_ids=t5_ids).last_hidden_state
        return PromptEmbeds(bert_states, t5_states)

    def _warn_if_truncated(self, prompts: list[str]) -> None:
        for name, tok in (("BERT", self.bert_tokenizer), ("T5", self.t5_tokenizer)):
            limit = min(tok.model_max_length, MAX_TEXT_TOKENS)
            for prompt in prompts:
                n = len(tok(prompt, truncation=False, verbose=False).input_ids)
                if n > limit:
                    warnings.warn(f"prompt is {n} {name} tokens long; only the first {limit} are used: {prompt[:60]!r}…",
                                  stacklevel=3)
