"""Which config keys define the trained model, so that a resume cannot silently change it.

A checkpoint carries the config it was trained with. Resuming it under a config that differs in a key
that defines the model (its shape, the scale schedule, the tokenizer or text encoder it reads, the
conditioning strategy and its options, the task) would continue training a different model under the
old weights; those changes are refused, naming every key. Everything else (steps, learning-rate
schedule, data, logging, sampling, threads, ...) may change on resume.
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping

# Prefixes of keys that define the model. Within them, RUNTIME_KEYS change how, not what, is computed.
MODEL_DEFINING = ("task", "model.", "tokenizer.", "text.", "conditioning.")
RUNTIME_KEYS = (
    "model.attention",  # blockwise and masked attention compute the same function
    "model.activation_checkpointing",
    "model.compile_blocks",
    "model.init_from",  # only read when a run starts from scratch
    "tokenizer.checkpoint",  # files move; the architecture keys below still must match
    "text.path",
    "text.dtype",
    # Tokenizer-training loss weights: they shape how a tokenizer is trained, not what it is.
    "tokenizer.l1_loss_weight",
    "tokenizer.l2_loss_weight",
    "tokenizer.entropy_loss_weight",
    "tokenizer.codebook_entropy_gamma",
    "tokenizer.entropy_inv_temperature",
    "tokenizer.commitment_loss_weight",
    "tokenizer.latent_commitment_weight",
    "tokenizer.cycle_loss_weight",
    "tokenizer.straight_through",
    "tokenizer.channels_last",
)


def _flatten(data: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in data.items():
        if isinstance(value, Mapping) and not (prefix == "conditioning." and key == "options"):
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def defines_model(key: str) -> bool:
    return key.startswith(MODEL_DEFINING) and not key.startswith(RUNTIME_KEYS)


def model_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """``key: old -> new`` for every model-defining key whose value differs (empty: safe to resume).

    ``old`` and ``new`` are plain config dicts (``to_dict(cfg)``). A key missing on one side (a
    checkpoint from an older version) counts as a change only when the other side is not None.
    """
    before, after = dict(_flatten(old)), dict(_flatten(new))
    changes = []
    for key in sorted(set(before) | set(after)):
        if not defines_model(key):
            continue
        a, b = before.get(key), after.get(key)
        if a != b:
            changes.append(f"{key}: {a!r} -> {b!r}")
    return changes


__all__ = ["MODEL_DEFINING", "RUNTIME_KEYS", "defines_model", "model_changes"]
