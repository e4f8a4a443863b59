"""Text encoders producing the transformer's text features: frozen T5 (released models) or a small
trainable word-level encoder (the synthetic benchmark)."""

from typing import Any

from varedit_lab.text.encoder import TextEncoder, tiny_t5
from varedit_lab.text.words import WordTextEncoder, read_vocabulary


def build_text_encoder(cfg: Any) -> TextEncoder | WordTextEncoder:
    """The encoder ``cfg`` (a TextConfig) names."""
    return WordTextEncoder.from_config(cfg) if cfg.kind == "words" else TextEncoder.from_config(cfg)


__all__ = ["TextEncoder", "WordTextEncoder", "build_text_encoder", "read_vocabulary", "tiny_t5"]
