"""Infinity's bitwise multi-scale visual tokenizer (BSQ VAE): model, checkpoints, training.

``TokenizerModule`` (the LightningModule) and ``build_tokenizer_task`` are imported lazily, so that
using the tokenizer does not import Lightning.
"""

from typing import Any

from varedit_lab.tokenizer.checkpoint import TokenizerLoadError, load_tokenizer, load_vae_state_dict, save_tokenizer
from varedit_lab.tokenizer.vae import BSQTokenizer, VAEArch, to_uint8

_LAZY = {"TokenizerModule", "build_tokenizer_task"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from varedit_lab.tokenizer import module

        return getattr(module, name)
    raise AttributeError(f"module 'varedit_lab.tokenizer' has no attribute {name!r}")


__all__ = [
    "BSQTokenizer",
    "TokenizerLoadError",
    "TokenizerModule",
    "VAEArch",
    "build_tokenizer_task",
    "load_tokenizer",
    "load_vae_state_dict",
    "save_tokenizer",
    "to_uint8",
]
