"""Named transformer shapes: ``tiny`` for CI, and the released ``infinity_2b`` / ``infinity_8b``."""

from __future__ import annotations

from typing import Any

PRESETS: dict[str, dict[str, Any]] = {
    # CI / debug model: seconds on a CPU.
    "tiny": dict(depth=2, width=64, num_heads=2, mlp_ratio=4.0, text_channels=128, text_maxlen=64, block_chunks=1),
    # Released shapes (reference-model.md section 15.1).
    "infinity_2b": dict(depth=32, width=2048, num_heads=16, mlp_ratio=4.0, text_channels=2048, text_maxlen=512, block_chunks=8),
    "infinity_8b": dict(depth=40, width=3584, num_heads=28, mlp_ratio=4.0, text_channels=2048, text_maxlen=512, block_chunks=8),
}

# The tokenizer each released transformer reads (bits per VAE position, 2x2 patchify).
RELEASED_TOKENIZERS: dict[str, dict[str, Any]] = {
    "infinity_2b": dict(codebook_dim=32, patch_size=16, apply_spatial_patchify=False),
    "infinity_8b": dict(codebook_dim=14, patch_size=8, apply_spatial_patchify=True),
}


def mlp_hidden(width: int, mlp_ratio: float) -> int:
    """The release's FFN width: ``round(width * ratio / 256) * 256`` (Python rounding); below
    that granularity (tiny debug widths, where it would round to 0) ``width * ratio``."""
    hidden = round(width * mlp_ratio / 256) * 256
    return hidden if hidden > 0 else int(width * mlp_ratio)


def preset(name: str) -> dict[str, Any]:
    if name not in PRESETS:
        raise KeyError(f"unknown model preset {name!r}; available: {sorted(PRESETS)}")
    return dict(PRESETS[name])
