"""Build the transformer from the run config (``model`` + ``tokenizer`` sections)."""

from __future__ import annotations

from typing import Any

from varedit_lab.model.presets import mlp_hidden, preset
from varedit_lab.model.transformer import TransformerConfig, VAREditTransformer


def transformer_config(model_cfg: Any, codebook_dim: int, patchify: bool) -> TransformerConfig:
    """Preset values, overridden by every non-null field of ``model_cfg`` (a ModelConfig)."""
    shape = preset(model_cfg.preset)
    for key in ("depth", "width", "num_heads", "mlp_ratio", "text_channels", "text_maxlen"):
        value = getattr(model_cfg, key)
        if value is not None:
            shape[key] = value
    chunks = shape.pop("block_chunks")
    depth = shape["depth"]
    return TransformerConfig(
        depth=depth,
        width=shape["width"],
        num_heads=shape["num_heads"],
        mlp_hidden=mlp_hidden(shape["width"], shape["mlp_ratio"]),
        text_channels=shape["text_channels"],
        text_maxlen=shape["text_maxlen"],
        codebook_dim=codebook_dim,
        patchify=patchify,
        drop_path_rate=model_cfg.drop_path_rate,
        cond_drop_rate=model_cfg.cond_drop_rate,
        attention=model_cfg.attention,
        activation_checkpointing=model_cfg.activation_checkpointing,
        block_chunks=chunks if depth % chunks == 0 else 1,
    )


def build_transformer(model_cfg: Any, codebook_dim: int, patchify: bool) -> VAREditTransformer:
    return VAREditTransformer(transformer_config(model_cfg, codebook_dim, patchify))
