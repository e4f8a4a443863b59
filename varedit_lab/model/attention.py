"""Executes a plan's per-layer visibility with ``scaled_dot_product_attention``.

Keys live in *sequence coordinates*: during teacher forcing they are the layer's own keys for the
whole sequence; during cached inference they are the layer's KV cache, filled block by block. Each
query block sees a set of key blocks (the layout's visibility row) plus, in some layers, extra blocks
derived from the sequence keys (SAR's pooled reference).

``blockwise`` runs one SDPA call per query block over exactly its visible keys: no padding and no
masked-out work (the release pads 777 tokens to 896 and runs dense masked attention). ``masked`` runs
one SDPA call per chunk with a boolean token mask; it is the simple reference path.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F

from conditioning.base import LayerVisibility, SequenceLayout

ATTENTION_IMPLS = ("blockwise", "masked")


@dataclass
class KVCache:
    """Per-layer keys/values of every processed token, preallocated for the whole sequence."""

    keys: list[torch.Tensor]  # per layer (B, H, L, D)
    values: list[torch.Tensor]

    @classmethod
    def allocate(cls, depth: int, batch: int, heads: int, length: int, head_dim: int, device, dtype) -> "KVCache":
        shape = (batch, heads, length, head_dim)
        return cls(
            [torch.empty(shape, device=device, dtype=dtype) for _ in range(depth)],
            [torch.empty(shape, device=device, dtype=dtype) for _ in range(depth)],
        )


@dataclass
class AttentionContext:
    """What self-attention needs to know about the current forward call."""

    layout: SequenceLayout
    cos: torch.Tensor  # (N, D/2) RoPE of the chunk's tokens
    sin: torch.Tensor
    first_block: int  # the chunk is blocks [first_block, last_block) of the sequence
    last_block: int
    impl: str = "blockwise"
    cache: KVCache | None = None
    # Queries before this sequence index only provide keys/values (their outputs are unused).
    query_from: int = 0

    @property
    def start(self) -> int:
        return self.layout.block_starts[self.first_block]

    @property
    def end(self) -> int:
        return self.layout.block_range(self.last_block - 1)[1]


@lru_cache(maxsize=4096)
def _key_pieces(layout: SequenceLayout, vis: LayerVisibility, block: int) -> tuple[tuple[str, int, int], ...]:
    """Visible keys of a query block as merged ("seq", start, end) ranges and ("ext", j, 0) blocks."""
    pieces: list[tuple[str, int, int]] = []
    nb = layout.num_blocks
    for kb in torch.nonzero(vis.visible[block]).flatten().tolist():
        if kb >= nb:
            pieces.append(("ext", kb - nb, 0))
            continue
        s, e = layout.block_range(kb)
        if pieces and pieces[-1][0] == "seq" and pieces[-1][2] == s:
            pieces[-1] = ("seq", pieces[-1][1], e)
        else:
            pieces.append(("seq", s, e))
    return tuple(pieces)


def _block_views(store: torch.Tensor, layout: SequenceLayout, offset: int, blocks) -> list[torch.Tensor]:
    return [store[:, :, layout.block_starts[b] - offset : layout.block_range(b)[1] - offset] for b in blocks]


class _ExtraKV:
    """Lazily computed extra key/value blocks of one layer call."""

    def __init__(self, vis: LayerVisibility, layout: SequenceLayout, k_store, v_store, offset: int):
        self.vis, self.layout = vis, layout
        self.k_store, self.v_store, self.offset = k_store, v_store, offset
        self.done: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def get(self, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        if j not in self.done:
            ext = self.vis.extension
            blocks = range(self.layout.num_blocks)
            needed = set(ext.source_blocks(j))
            keys = [v if i in needed else None for i, v in zip(blocks, _block_views(self.k_store, self.layout, self.offset, blocks))]
            values = [v if i in needed else None for i, v in zip(blocks, _block_views(self.v_store, self.layout, self.offset, blocks))]
            self.done[j] = ext.compute(j, keys, values)
        return self.done[j]


def self_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int, ctx: AttentionContext) -> torch.Tensor:
    """Attention of the chunk's queries ``q`` (B, H, N, D) given its keys/values; returns (B, H, Nq, D)
    where Nq counts the queries from ``ctx.query_from`` on. Writes k/v to the cache when there is one."""
    layout, vis = ctx.layout, ctx.layout.visibility(layer)
    if ctx.cache is not None:
        ctx.cache.keys[layer][:, :, ctx.start : ctx.end] = k
        ctx.cache.values[layer][:, :, ctx.start : ctx.end] = v
        k_store, v_store, offset = ctx.cache.keys[layer], ctx.cache.values[layer], 0
    else:
        k_store, v_store, offset = k, v, ctx.start
    extra = _ExtraKV(vis, layout, k_store, v_store, offset) if vis.extension is not None else None
    first_q = max(ctx.start, ctx.query_from)
    if first_q >= ctx.end:  # only keys/values were needed (e.g. the source in the last layer)
        return q[:, :, q.shape[2] :]
    if ctx.impl == "masked":
        return _masked(q[:, :, first_q - ctx.start :], k_store, v_store, offset, first_q, layer, ctx, extra)
    outputs = []
    for block in range(ctx.first_block, ctx.last_block):
        s, e = layout.block_range(block)
        if e <= first_q:
            continue
        qb = q[:, :, max(s, first_q) - ctx.start : e - ctx.start]
        ks, vs = [], []
        for kind, a, b in _key_pieces(layout, vis, block):
            if kind == "seq":
                if a < offset:
                    raise RuntimeError(f"block {block} sees keys [{a}, {b}) that are neither cached nor in this chunk")
                ks.append(k_store[:, :, a - offset : b - offset])
                vs.append(v_store[:, :, a - offset : b - offset])
            else:
                ke, ve = extra.get(a)
                ks.append(ke)
                vs.append(ve)
        kb = ks[0] if len(ks) == 1 else torch.cat(ks, dim=2)
        vb = vs[0] if len(vs) == 1 else torch.cat(vs, dim=2)
        outputs.append(F.scaled_dot_product_attention(qb, kb, vb, scale=1.0))
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=2)


def _visible_extras(layout: SequenceLayout, vis: LayerVisibility, first_block: int, last_block: int) -> tuple[int, ...]:
    nb = layout.num_blocks
    rows = vis.visible[first_block:last_block, nb:]
    return tuple(torch.nonzero(rows.any(dim=0)).flatten().tolist())


@lru_cache(maxsize=256)
def _chunk_mask(layout: SequenceLayout, layer: int, q_start: int, q_end: int, k_end: int, extras: tuple[int, ...], device) -> torch.Tensor:
    vis = layout.visibility(layer)
    full = layout.token_mask(layer)
    ext_starts = [layout.length + sum(vis.extension.block_sizes[:j]) for j in extras] if extras else []
    ext_cols = [torch.arange(s, s + vis.extension.block_sizes[j]) for s, j in zip(ext_starts, extras)]
    cols = torch.cat([torch.arange(k_end), *ext_cols])
    return full[q_start:q_end][:, cols].to(device)


def _masked(q, k_store, v_store, offset, first_q, layer, ctx: AttentionContext, extra: _ExtraKV | None) -> torch.Tensor:
    """One SDPA call over [keys up to the chunk end ; the extra blocks the chunk sees] with a bool mask."""
    if offset != 0:
        raise RuntimeError("masked attention needs the keys from position 0")
    ks, vs = [k_store[:, :, : ctx.end]], [v_store[:, :, : ctx.end]]
    extras: tuple[int, ...] = ()
    if extra is not None:
        extras = _visible_extras(ctx.layout, extra.vis, ctx.first_block, ctx.last_block)
        for j in extras:
            ke, ve = extra.get(j)
            ks.append(ke)
            vs.append(ve)
    k = ks[0] if len(ks) == 1 else torch.cat(ks, dim=2)
    v = vs[0] if len(vs) == 1 else torch.cat(vs, dim=2)
    mask = _chunk_mask(ctx.layout, layer, first_q, ctx.end, ctx.end, extras, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0)
