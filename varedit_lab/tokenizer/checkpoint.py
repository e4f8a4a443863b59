"""Loading and saving tokenizer checkpoints.

Accepted inputs (reference-model.md section 14.4):

* released Infinity VAE files: ``{'vae': state_dict}``, ``{'ema': state_dict}`` or a bare state dict,
  with wrapper names (``x.conv.weight``, ``x.norm.weight``) or plain names (``x.weight``);
* our own trained tokenizers: ``{'format': 'varedit-lab-tokenizer', 'config': {...}, 'vae': state_dict}``,
  which carry their architecture, so no config is needed.

Loading is strict: every missing, unexpected or mis-shaped key is named. The quantizer's ``mask``
buffers (``quantizer.lfq.mask`` / ``quantize.lfq.mask``) are a pure function of ``codebook_dim``;
either may be absent, and a present one must hold the expected values.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any, Mapping

import torch

from varedit_lab.checkpoint_io import CheckpointError, load_weights
from varedit_lab.model.compat import state_dict_mismatches
from varedit_lab.tokenizer.vae import BSQTokenizer, VAEArch

FORMAT = "varedit-lab-tokenizer"
_MASK_KEYS = ("quantizer.lfq.mask", "quantize.lfq.mask")
_WRAPPERS = ("conv", "norm")


class TokenizerLoadError(CheckpointError):
    """A checkpoint does not fit the tokenizer; the message names the offending keys."""


def unwrap_state_dict(obj: Any) -> dict[str, torch.Tensor]:
    """The VAE state dict inside a checkpoint object (``vae``/``ema`` wrappers or bare)."""
    if not isinstance(obj, Mapping):
        raise TokenizerLoadError(f"a tokenizer checkpoint must be a dict, got {type(obj).__name__}")
    for key in ("vae", "ema"):
        if key in obj and isinstance(obj[key], Mapping):
            return dict(obj[key])
    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return dict(obj)
    raise TokenizerLoadError(f"no VAE state dict found: expected a 'vae' or 'ema' entry or a bare state dict; keys {sorted(obj)[:10]}")


def normalize_keys(state_dict: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map plain names (``encoder.conv_in.weight``) onto the wrapper names the model uses."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key not in expected and "." in key:
            stem, leaf = key.rsplit(".", 1)
            for wrapper in _WRAPPERS:
                candidate = f"{stem}.{wrapper}.{leaf}"
                if candidate in expected:
                    key = candidate
                    break
        if key in out:
            raise TokenizerLoadError(f"{key}: given twice (under its plain and its wrapper name)")
        out[key] = value
    return out


def load_vae_state_dict(model: BSQTokenizer, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Strict load; raise :class:`TokenizerLoadError` listing every missing/unexpected/mis-shaped key."""
    expected = model.state_dict()
    sd = normalize_keys(state_dict, expected)
    for key in _MASK_KEYS:
        if key not in sd:
            sd[key] = expected[key]  # derived from codebook_dim; optional in the file
        elif sd[key].shape == expected[key].shape and not torch.equal(sd[key].to(expected[key].dtype), expected[key]):
            raise TokenizerLoadError(f"{key}: expected the bit weights 2^(d-1)..1 for d={model.codebook_dim}")
    problems = state_dict_mismatches(sd, expected)
    if problems:
        raise TokenizerLoadError("VAE state dict does not match the tokenizer architecture:\n  " + "\n  ".join(problems))
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in sd.items()}, strict=True)


def load_tokenizer(path: str | Path, cfg: Any = None) -> BSQTokenizer:
    """Build and strictly load a tokenizer from ``path``.

    Our checkpoints carry their architecture, which wins over ``cfg`` (an editor config's
    ``tokenizer:`` section holds schema defaults, so pointing ``checkpoint`` at a trained tokenizer
    must be enough). Released checkpoints need ``cfg`` (a TokenizerConfig or the same fields).
    """
    obj = load_weights(path, "tokenizer checkpoint")
    if isinstance(obj, Mapping) and obj.get("format") == FORMAT:
        arch = VAEArch.from_any(obj["config"])
    elif cfg is None:
        raise TokenizerLoadError(f"{path}: a released VAE checkpoint carries no architecture; pass the tokenizer config")
    else:
        arch = VAEArch.from_any(cfg)
    model = BSQTokenizer(arch)
    try:
        load_vae_state_dict(model, unwrap_state_dict(obj))
    except TokenizerLoadError as err:
        raise TokenizerLoadError(f"{path}: {err}") from None
    return model.eval()


def save_tokenizer(model: BSQTokenizer, path: str | Path, extra_config: Mapping[str, Any] | None = None) -> Path:
    """Write ``{'format', 'config', 'vae'}``; the state dict uses the released key names."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    config = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(model.arch).items()}
    config.update(extra_config or {})
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    torch.save({"format": FORMAT, "config": config, "vae": state}, path)
    return path
