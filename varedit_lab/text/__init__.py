"""Text encoders (frozen T5) producing the transformer's text features."""

from varedit_lab.text.encoder import TextEncoder, tiny_t5

__all__ = ["TextEncoder", "tiny_t5"]
