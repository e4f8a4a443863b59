"""A small *trainable* text encoder over a fixed instruction vocabulary.

The synthetic benchmark's instructions are built from a few dozen words ("make the blue circle
red"). A frozen random byte-level T5 hands the transformer a hash of such a string, which it can
barely learn to read; this encoder learns the vocabulary with the editor instead (word embeddings,
learned positions, a few pre-norm Transformer layers). Released models keep the frozen flan-t5-xl.

Words are lowercase and split on whitespace; index 0 pads, index 1 stands for a word outside the
vocabulary. Its parameters train with the editor and live in its checkpoints.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn as nn

from varedit_lab.model.transformer import TextFeatures

PAD, UNKNOWN = 0, 1


def read_vocabulary(path: str | Path) -> list[str]:
    """One word per line (``vocab.txt`` written by ``data synth``); blank lines ignored."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"text.vocabulary={path}: no such file. `varedit-lab data synth` writes vocab.txt next to the shards"
        )
    words = [line.strip().lower() for line in path.read_text().splitlines() if line.strip()]
    if not words or len(set(words)) != len(words):
        raise ValueError(f"text.vocabulary={path}: needs distinct words, one per line ({len(words)} lines read)")
    return words


class WordTextEncoder(nn.Module):
    """Instruction strings -> trainable features (B, L, width) and lengths (B,)."""

    trainable = True

    def __init__(self, vocabulary: Sequence[str], width: int, num_layers: int, num_heads: int, max_length: int):
        super().__init__()
        self.vocabulary = list(vocabulary)
        self.index = {word: i + 2 for i, word in enumerate(self.vocabulary)}
        self.max_length = max_length
        self.embed = nn.Embedding(len(self.vocabulary) + 2, width, padding_idx=PAD)
        self.position = nn.Parameter(torch.randn(max_length, width) * 0.02)
        layer = nn.TransformerEncoderLayer(width, num_heads, 4 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.layers = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)

    @classmethod
    def from_config(cls, cfg: Any) -> "WordTextEncoder":
        """``cfg``: a TextConfig with ``kind: words`` and ``vocabulary`` set."""
        if not cfg.vocabulary:
            raise ValueError("text.kind=words needs text.vocabulary (the vocab.txt that `data synth` writes)")
        return cls(read_vocabulary(cfg.vocabulary), cfg.words_width, cfg.words_layers, cfg.words_heads, cfg.max_length)

    @property
    def width(self) -> int:
        return self.embed.embedding_dim

    def token_ids(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L) word ids (right-padded with PAD) and lengths (B,); words beyond max_length are cut."""
        rows = [[self.index.get(word, UNKNOWN) for word in text.lower().split()][: self.max_length] or [UNKNOWN] for text in texts]
        ids = torch.full((len(rows), max(len(r) for r in rows)), PAD, dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row)
        return ids, torch.tensor([len(r) for r in rows])

    def encode(self, texts: Sequence[str]) -> TextFeatures:
        device = self.embed.weight.device
        ids, lengths = self.token_ids(texts)
        ids, lengths = ids.to(device), lengths.to(device)
        valid = torch.arange(ids.shape[1], device=device)[None] < lengths[:, None]
        hidden = self.embed(ids) + self.position[: ids.shape[1]]
        hidden = self.norm(self.layers(hidden, src_key_padding_mask=~valid))
        return TextFeatures(hidden * valid[..., None], lengths)


__all__ = ["WordTextEncoder", "read_vocabulary"]
