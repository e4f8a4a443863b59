"""Frozen T5 text encoder: a local Hugging Face folder (flan-t5-xl) or a tiny random T5.

The tiny encoder is built from a ``T5Config`` with seeded random weights and the byte-level
``ByT5Tokenizer`` (no files, no hub), so every process and rank builds the same encoder. Outputs are
:class:`~varedit_lab.model.transformer.TextFeatures`: right-padded features plus per-sample lengths.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Sequence

import torch
import torch.nn as nn

from varedit_lab.model.transformer import TextFeatures

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def tiny_t5(d_model: int, num_layers: int, num_heads: int, d_ff: int, seed: int) -> tuple[nn.Module, Any]:
    """A randomly initialised T5 encoder (byte vocabulary) and its tokenizer; same seed, same weights."""
    from transformers import ByT5Tokenizer, T5Config, T5EncoderModel

    tokenizer = ByT5Tokenizer()
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=d_model,
        d_kv=d_model // num_heads,
        d_ff=d_ff,
        num_layers=num_layers,
        num_heads=num_heads,
        feed_forward_proj="gated-gelu",
        is_encoder_decoder=False,
        use_cache=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = T5EncoderModel(config)
    return model, tokenizer


class TextEncoder(nn.Module):
    """Instruction strings -> T5 features. Frozen; embeddings of repeated strings are cached."""

    trainable = False

    def __init__(self, model: nn.Module, tokenizer: Any, max_length: int = 512, cache_size: int = 4096):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.cache_size = cache_size
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()

    @classmethod
    def from_config(cls, cfg: Any) -> "TextEncoder":
        """``cfg``: a TextConfig. ``path`` loads a local HF T5 folder; otherwise the tiny random T5."""
        dtype = _DTYPES[cfg.dtype]
        if cfg.path:
            from transformers import AutoTokenizer, T5EncoderModel

            model = T5EncoderModel.from_pretrained(cfg.path, dtype=dtype)
            tokenizer = AutoTokenizer.from_pretrained(cfg.path)
        else:
            model, tokenizer = tiny_t5(cfg.tiny_d_model, cfg.tiny_num_layers, cfg.tiny_num_heads, cfg.tiny_d_ff, cfg.tiny_seed)
            model = model.to(dtype)
        return cls(model, tokenizer, cfg.max_length)

    @property
    def width(self) -> int:
        return int(self.model.config.d_model)

    def train(self, mode: bool = True) -> "TextEncoder":
        return super().train(False)  # frozen: always eval (no dropout)

    @torch.no_grad()
    def _encode_uncached(self, texts: Sequence[str]) -> list[torch.Tensor]:
        device = next(self.model.parameters()).device
        tok = self.tokenizer(list(texts), padding="longest", truncation=True, max_length=self.max_length, return_tensors="pt")
        ids, mask = tok["input_ids"].to(device), tok["attention_mask"].to(device)
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state.float()
        lengths = mask.sum(1).clamp_min(1)
        return [hidden[i, : lengths[i]].cpu() for i in range(len(texts))]

    @torch.no_grad()
    def encode(self, texts: Sequence[str]) -> TextFeatures:
        """Features (B, L_max, width) right-padded with zeros, and lengths (B,)."""
        missing = list(dict.fromkeys(t for t in texts if t not in self._cache))
        if missing:
            for text, feats in zip(missing, self._encode_uncached(missing)):
                self._cache[text] = feats
        per_text = []
        for text in texts:
            self._cache.move_to_end(text)
            per_text.append(self._cache[text])
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        lengths = torch.tensor([f.shape[0] for f in per_text])
        feats = nn.utils.rnn.pad_sequence(per_text, batch_first=True)
        device = next(self.model.parameters()).device
        return TextFeatures(feats.to(device), lengths.to(device))
