"""Released checkpoint layout <-> ours, and strict loading.

The release saves a flat state dict whose blocks live under ``block_chunks.{c}.module.{j}.`` (global
block ``i = c * n + j``, ``n`` blocks per chunk) and carries all-zero ``zero_k_bias`` buffers. We name
blocks ``blocks.{i}.`` and keep every leaf name, so conversion is a key rename plus the zero buffers.
Loading is strict: any other missing or unexpected key is reported by name.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Mapping

import torch

from varedit_lab.checkpoint_io import CheckpointError, load_weights
from varedit_lab.model.transformer import VAREditTransformer

_RELEASED_BLOCK = re.compile(r"^block_chunks\.(\d+)\.module\.(\d+)\.(.+)$")
_OUR_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")
# Buffers the release keeps that carry no information (must be all zero).
_ZERO_BUFFERS = ("sa.zero_k_bias", "ca.zero_k_bias")
_NONBLOCK_ZERO_BUFFERS = ("text_proj_for_sos.ca.zero_k_bias",)
# Non-persistent bookkeeping the release's own loader drops.
_IGNORED = ("lvl_1L", "attn_bias_for_masking", "Infinity_visible_kvlen", "Infinity_invisible_qlen")


def infer_blocks_per_chunk(state_dict: Mapping[str, torch.Tensor]) -> int:
    js = {int(m.group(2)) for k in state_dict if (m := _RELEASED_BLOCK.match(k))}
    return max(js) + 1 if js else 1


def from_released(state_dict: Mapping[str, torch.Tensor], blocks_per_chunk: int | None = None) -> dict[str, torch.Tensor]:
    """Released keys -> ours. Zero buffers are checked and dropped; non-zero ones raise."""
    n = blocks_per_chunk or infer_blocks_per_chunk(state_dict)
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key in _IGNORED:
            continue
        m = _RELEASED_BLOCK.match(key)
        if m:
            chunk, j, leaf = int(m.group(1)), int(m.group(2)), m.group(3)
            key = f"blocks.{chunk * n + j}.{leaf}"
            leaf_name = leaf
        else:
            leaf_name = key
        if leaf_name in _ZERO_BUFFERS or key in _NONBLOCK_ZERO_BUFFERS:
            if torch.count_nonzero(value):
                raise CheckpointError(f"{key}: expected the release's all-zero buffer, found non-zero values")
            continue
        out[key] = value
    return out


def to_released(state_dict: Mapping[str, torch.Tensor], block_chunks: int) -> dict[str, torch.Tensor]:
    """Our keys -> released keys (with the zero buffers the release's modules expect)."""
    depth = 1 + max((int(m.group(1)) for k in state_dict if (m := _OUR_BLOCK.match(k))), default=-1)
    if depth % block_chunks:
        raise ValueError(f"depth {depth} is not divisible by block_chunks {block_chunks}")
    n = depth // block_chunks
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        m = _OUR_BLOCK.match(key)
        if m:
            i, leaf = int(m.group(1)), m.group(2)
            key = f"block_chunks.{i // n}.module.{i % n}.{leaf}"
            if leaf == "sa.v_bias":
                out[key.replace("v_bias", "zero_k_bias")] = torch.zeros_like(value)
            if leaf == "ca.v_bias":
                out[key.replace("v_bias", "zero_k_bias")] = torch.zeros_like(value)
        out[key] = value
    out["text_proj_for_sos.ca.zero_k_bias"] = torch.zeros_like(state_dict["text_proj_for_sos.ca.v_bias"])
    return out


def is_released_layout(state_dict: Mapping[str, torch.Tensor]) -> bool:
    return any(_RELEASED_BLOCK.match(k) for k in state_dict)


def fit_cfg_uncond(state_dict: dict[str, torch.Tensor], model: VAREditTransformer) -> None:
    """Pad (with the model's own rows) or truncate ``cfg_uncond`` to the model's text_maxlen, as the
    release's loader does."""
    old = state_dict.get("cfg_uncond")
    new = model.cfg_uncond.data
    if old is None or old.shape[0] == new.shape[0]:
        return
    if old.shape[1] != new.shape[1]:
        raise CheckpointError(f"cfg_uncond: text width {old.shape[1]} in the checkpoint, {new.shape[1]} in the model")
    n = min(old.shape[0], new.shape[0])
    state_dict["cfg_uncond"] = torch.cat([old[:n].to(new), new[n:]]) if n == old.shape[0] else old[:n]


def on_meta(model: torch.nn.Module) -> bool:
    """Built under ``torch.device("meta")``: shapes only, no storage (see :func:`load_released`)."""
    return any(p.is_meta for p in model.parameters())


def load_state_dict_strict(model: VAREditTransformer, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Load ours-or-released keys strictly; raise :class:`CheckpointError` naming every problem.

    A model on the meta device takes the tensors themselves (``assign=True``, cast to the model's
    dtypes only where they differ), so a memory-mapped file is not copied a second time.
    """
    sd = from_released(state_dict) if is_released_layout(state_dict) else dict(state_dict)
    for key in _NONBLOCK_ZERO_BUFFERS:
        sd.pop(key, None)
    meta = on_meta(model)
    if meta and "cfg_uncond" in sd and sd["cfg_uncond"].shape[0] < model.cfg_uncond.shape[0]:
        raise CheckpointError(f"cfg_uncond: the checkpoint holds {sd['cfg_uncond'].shape[0]} rows, the model "
                              f"{model.cfg_uncond.shape[0]}; padding needs the model's own rows (build it off the meta device)")
    fit_cfg_uncond(sd, model)
    expected = model.state_dict()
    problems = state_dict_mismatches(sd, expected)
    if problems:
        raise CheckpointError("state dict does not match the model:\n  " + "\n  ".join(problems))
    if meta:
        sd = {k: v if v.dtype == expected[k].dtype else v.to(expected[k].dtype) for k, v in sd.items()}
    model.load_state_dict(sd, strict=True, assign=meta)


def state_dict_mismatches(state_dict: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> list[str]:
    """One line each for the missing keys, the unexpected keys and the shape mismatches (empty if none)."""
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    shapes = sorted(
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in set(state_dict) & set(expected)
        if state_dict[k].shape != expected[k].shape
    )
    lines = []
    if missing:
        lines.append(f"missing keys ({len(missing)}): {missing}")
    if unexpected:
        lines.append(f"unexpected keys ({len(unexpected)}): {unexpected}")
    if shapes:
        lines.append(f"shape mismatches ({len(shapes)}): {shapes}")
    return lines


def nonfinite_tensors(state_dict: Mapping[str, object]) -> list[str]:
    """Names of the floating-point tensors holding NaN or infinity (a diverged run's weights)."""
    return [
        key for key, value in state_dict.items()
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all())
    ]


def check_finite(state_dict: Mapping[str, object], source: str) -> None:
    bad = nonfinite_tensors(state_dict)
    if bad:
        raise CheckpointError(f"{source}: non-finite weights (NaN/inf) in {bad[:5]}{' ...' if len(bad) > 5 else ''}; "
                              "the run diverged before this checkpoint: use an earlier one")


def load_released(model: VAREditTransformer, path: str | Path) -> None:
    """Load a released VAREdit/Infinity transformer ``.pth`` (flat state dict) strictly.

    The file is memory-mapped; into a model built on the meta device the mapped tensors are assigned
    (no copy), so loading costs about the file's size in host memory rather than twice that.
    """
    state = load_weights(path, "transformer checkpoint", mmap=True)
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if not isinstance(state, dict) or "varedit_config" in state or "state_dict" in state:
        kind = "a varedit-lab training checkpoint (use it with resume= or --ckpt)" if isinstance(state, dict) else f"a {type(state).__name__}"
        raise CheckpointError(f"{path}: model.init_from takes a transformer state dict (a released .pth or `varedit-lab export` output); this is {kind}")
    check_finite(state, str(path))
    load_state_dict_strict(model, state)
