"""Infinity's bitwise multi-scale visual tokenizer (BSQ VAE): model, checkpoints, training."""

from varedit_lab.tokenizer.checkpoint import TokenizerLoadError, load_tokenizer, load_vae_state_dict, save_tokenizer
from varedit_lab.tokenizer.vae import BSQTokenizer, VAEArch, to_uint8

__all__ = [
    "BSQTokenizer",
    "TokenizerLoadError",
    "VAEArch",
    "load_tokenizer",
    "load_vae_state_dict",
    "save_tokenizer",
    "to_uint8",
]
