"""Executes a plan's per-layer visibility with ``scaled_dot_product_attention``.

Keys live in *sequence coordinates*: during teacher forcing they are the layer's own keys for the
whole sequence; during cached inference they are the layer's KV cache, filled block by block. Each
query block sees a set of key blocks (the layout's visibility row) plus, in some layers, extra blocks
derived from the sequence keys (SAR's pooled reference).

``blockwise`` runs one SDPA call per query block over exactly its visible keys: no padding and no
masked-out work (the release pads 777 tokens to 896 and runs dense masked attention). Keys that are
one contiguous range of the store are a view (max-scale: every block sees a prefix); others are
concatenated. On CPU its backward is hand-written (:class:`_BlockwiseFlashCPU`). ``masked`` runs
one SDPA call per chunk with a boolean token mask; it is the simple reference path.

Keys, values, queries and outputs are (B, H, N, D) views of (B, N, H, D) memory throughout (the
layout the projections produce and the CPU flash kernel reads and writes), so no head permutes are
ever copied.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from conditioning.base import LayerVisibility, SequenceLayout

ATTENTION_IMPLS = ("blockwise", "masked")


@dataclass
class KVCache:
    """Per-layer keys/values of every processed token, preallocated for the whole sequence."""

    keys: list[torch.Tensor]  # per layer (B, H, L, D)
    values: list[torch.Tensor]

    @classmethod
    def allocate(cls, depth: int, batch: int, heads: int, length: int, head_dim: int, device, dtype) -> "KVCache":
        # (B, H, L, D) views of (B, L, H, D) memory, the layout the projections produce.
        def buffer() -> torch.Tensor:
            return torch.empty(batch, length, heads, head_dim, device=device, dtype=dtype).transpose(1, 2)

        return cls([buffer() for _ in range(depth)], [buffer() for _ in range(depth)])


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
    cis: torch.Tensor | None = None  # (N, D/2) complex cos + i sin; derived from cos/sin if None

    @property
    def rope_cis(self) -> torch.Tensor:
        return self.cis if self.cis is not None else torch.complex(self.cos, self.sin)

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


class _ExtraKV:
    """Lazily computed extra key/value blocks of one layer call."""

    def __init__(self, vis: LayerVisibility, layout: SequenceLayout, k_store, v_store, offset: int):
        self.vis, self.layout = vis, layout
        self.k_store, self.v_store, self.offset = k_store, v_store, offset
        self.done: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.views: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def _block(self, block: int) -> tuple[torch.Tensor, torch.Tensor]:
        # One view per block and layer call, shared by every extra block computed from it: autograd
        # then sums their gradients at the block's size and scatters them into the store once
        # (a fresh slice per extra block would cost a full-size zero tensor each).
        if block not in self.views:
            s, e = self.layout.block_range(block)
            if s < self.offset:
                raise RuntimeError(f"extra keys read block {block} [{s}, {e}), which is neither cached nor in this chunk")
            self.views[block] = (self.k_store[:, :, s - self.offset : e - self.offset], self.v_store[:, :, s - self.offset : e - self.offset])
        return self.views[block]

    def get(self, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        if j not in self.done:
            keys: list[torch.Tensor | None] = [None] * self.layout.num_blocks
            values: list[torch.Tensor | None] = [None] * self.layout.num_blocks
            for block in self.vis.extension.source_blocks(j):
                keys[block], values[block] = self._block(block)
            self.done[j] = self.vis.extension.compute(j, keys, values)
        return self.done[j]


@dataclass(frozen=True)
class _Call:
    """One SDPA call of the blockwise executor: query rows [q0, q1) (relative to the first computed
    query) against the concatenation of ``pieces``: (-1, a, b) = rows [a, b) of the key store,
    (j, 0, 0) = the j-th extra block passed to the call."""

    q0: int
    q1: int
    pieces: tuple[tuple[int, int, int], ...]


@lru_cache(maxsize=4096)
def _block_calls(
    layout: SequenceLayout, layer: int, first_block: int, last_block: int, first_q: int, offset: int
) -> tuple[tuple[_Call, ...], tuple[int, ...]]:
    """The calls of one layer call and the extra blocks they read (in the order passed to them)."""
    vis = layout.visibility(layer)
    calls: list[_Call] = []
    extras: list[int] = []
    for block in range(first_block, last_block):
        s, e = layout.block_range(block)
        if e <= first_q:
            continue
        pieces = []
        for kind, a, b in _key_pieces(layout, vis, block):
            if kind == "seq":
                if a < offset:
                    raise RuntimeError(f"block {block} sees keys [{a}, {b}) that are neither cached nor in this chunk")
                pieces.append((-1, a - offset, b - offset))
            else:
                if a not in extras:
                    extras.append(a)
                pieces.append((extras.index(a), 0, 0))
        calls.append(_Call(max(s, first_q) - first_q, e - first_q, tuple(pieces)))
    return tuple(calls), tuple(extras)


def _rows_of(t: torch.Tensor, store: torch.Tensor) -> tuple[int, int] | None:
    """The rows [a, b) of ``store`` that ``t`` is a view of (a slice along dim 2), else None."""
    if t.device != store.device or t.dtype != store.dtype or t.dim() != 4 or t.stride() != store.stride():
        return None
    if t.shape[:2] != store.shape[:2] or t.shape[3] != store.shape[3]:
        return None
    if t.untyped_storage().data_ptr() != store.untyped_storage().data_ptr():
        return None
    delta, step = t.storage_offset() - store.storage_offset(), store.stride(2)
    if step <= 0 or delta % step:
        return None
    a = delta // step
    return (a, a + t.shape[2]) if 0 <= a and a + t.shape[2] <= store.shape[2] else None


def _store_rows(k: torch.Tensor, v: torch.Tensor, k_store: torch.Tensor, v_store: torch.Tensor) -> tuple[int, int] | None:
    """Rows [a, b) when extra keys and values are both the same row range of the stores."""
    rows = _rows_of(k, k_store)
    return rows if rows is not None and rows == _rows_of(v, v_store) else None


@lru_cache(maxsize=4096)
def _resolve_aliases(calls: tuple[_Call, ...], aliases: tuple[tuple[int, int] | None, ...]) -> tuple[tuple[_Call, ...], tuple[int, ...]]:
    """Read extra blocks that are plain row ranges of the key store (e.g. SAR's identity pooling at
    the finest scale) from the store, merging adjacent ranges: one view instead of a ``cat`` copy.
    Returns the calls and the extra blocks still read (the new extra indices follow this order)."""
    resolved = []
    for call in calls:
        ranges = sorted((aliases[j] if j >= 0 else (a, b)) for j, a, b in call.pieces if j < 0 or aliases[j] is not None)
        pieces: list[tuple[int, int, int]] = []
        for a, b in ranges:  # the store's rows in order (key order does not change attention)
            if pieces and pieces[-1][2] == a:
                pieces[-1] = (-1, pieces[-1][1], b)
            else:
                pieces.append((-1, a, b))
        pieces += [(j, a, b) for j, a, b in call.pieces if j >= 0 and aliases[j] is None]
        resolved.append(pieces)
    used = sorted({j for pieces in resolved for j, _, _ in pieces if j >= 0})
    index = {j: i for i, j in enumerate(used)}
    out = tuple(
        _Call(call.q0, call.q1, tuple((index[j], a, b) if j >= 0 else (j, a, b) for j, a, b in pieces))
        for call, pieces in zip(calls, resolved)
    )
    return out, tuple(used)


def _gather(pieces: tuple[tuple[int, int, int], ...], store: torch.Tensor, extras: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Keys (or values) of one call: a view when they are one contiguous range of the store."""
    parts = [store[:, :, a:b] if j < 0 else extras[j] for j, a, b in pieces]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)


def _new_output(q: torch.Tensor) -> torch.Tensor:
    """(B, H, N, D) view of a (B, N, H, D) buffer: the output projection then reads it without a copy."""
    b, h, n, d = q.shape
    return q.new_empty(b, n, h, d).transpose(1, 2)


def _flash_cpu(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # The kernel F.scaled_dot_product_attention dispatches to on CPU; it also returns the
    # log-sum-exp that its backward needs.
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, scale=1.0)


class _BlockwiseFlashCPU(torch.autograd.Function):
    """Blockwise attention with a hand-written backward (CPU flash kernels).

    Autograd through per-block slices of q/k/v allocates a zero tensor of the full size for every
    slice's gradient, copies the slice in and sums them all (3 x blocks full-size passes per layer),
    and re-concatenates the per-block outputs. Here the outputs go straight into one buffer and each
    block's gradients are accumulated in place into one dq/dk/dv (and one per extra block).
    """

    @staticmethod
    def forward(ctx, calls, num_extras, q, k, v, *extras):
        # Extra blocks come flat (keys, then values) so that autograd tracks them.
        k_extras, v_extras = extras[:num_extras], extras[num_extras:]
        out = _new_output(q)
        lses = []
        for call in calls:
            o, lse = _flash_cpu(q[:, :, call.q0 : call.q1], _gather(call.pieces, k, k_extras), _gather(call.pieces, v, v_extras))
            out[:, :, call.q0 : call.q1] = o
            lses.append(lse)
        ctx.calls, ctx.num_extras = calls, len(k_extras)
        ctx.save_for_backward(q, k, v, out, *k_extras, *v_extras, *lses)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        q, k, v, out, *rest = ctx.saved_tensors
        ne = ctx.num_extras
        k_extras, v_extras, lses = tuple(rest[:ne]), tuple(rest[ne : 2 * ne]), rest[2 * ne :]
        dq = torch.empty_like(q)
        dk, dv = torch.zeros_like(k), torch.zeros_like(v)
        # Extra blocks are usually seen by one query block: their gradient is then a view of that
        # block's key gradient (no zero buffer, no add).
        dk_extras: list[torch.Tensor | None] = [None] * ne
        dv_extras: list[torch.Tensor | None] = [None] * ne
        for call, lse in zip(ctx.calls, lses):
            rows = slice(call.q0, call.q1)
            kb, vb = _gather(call.pieces, k, k_extras), _gather(call.pieces, v, v_extras)
            gq, gk, gv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
                grad_out[:, :, rows], q[:, :, rows], kb, vb, out[:, :, rows], lse, 0.0, False, scale=1.0
            )
            dq[:, :, rows] = gq
            pos = 0
            for j, a, b in call.pieces:
                n = b - a if j < 0 else k_extras[j].shape[2]
                gk_piece, gv_piece = gk[:, :, pos : pos + n], gv[:, :, pos : pos + n]
                if j < 0:
                    dk[:, :, a:b].add_(gk_piece)
                    dv[:, :, a:b].add_(gv_piece)
                elif dk_extras[j] is None:
                    dk_extras[j], dv_extras[j] = gk_piece, gv_piece
                else:
                    dk_extras[j], dv_extras[j] = dk_extras[j] + gk_piece, dv_extras[j] + gv_piece
                pos += n
        return None, None, dq, dk, dv, *dk_extras, *dv_extras


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
    q = q[:, :, first_q - ctx.start :]
    if ctx.impl == "masked":
        return _masked(q, k_store, v_store, offset, first_q, layer, ctx, extra)
    calls, extra_ids = _block_calls(layout, layer, ctx.first_block, ctx.last_block, first_q, offset)
    pairs = [extra.get(j) for j in extra_ids]
    if pairs:
        calls, kept = _resolve_aliases(calls, tuple(_store_rows(ke, ve, k_store, v_store) for ke, ve in pairs))
        pairs = [pairs[j] for j in kept]
    k_extras, v_extras = tuple(p[0] for p in pairs), tuple(p[1] for p in pairs)
    tensors = (q, k_store, v_store, *k_extras, *v_extras)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    # The hand-written backward calls the CPU kernels directly (no autocast, one dtype); anything
    # else takes the generic path, whose SDPA calls autograd and autocast handle.
    if needs_grad and q.device.type == "cpu" and all(t.dtype == q.dtype for t in tensors):
        return _BlockwiseFlashCPU.apply(calls, len(k_extras), q, k_store, v_store, *k_extras, *v_extras)
    if len(calls) == 1:
        call = calls[0]
        kb, vb = _gather(call.pieces, k_store, k_extras), _gather(call.pieces, v_store, v_extras)
        return F.scaled_dot_product_attention(q, kb, vb, scale=1.0)
    out = _new_output(q)
    for call in calls:
        kb, vb = _gather(call.pieces, k_store, k_extras), _gather(call.pieces, v_store, v_extras)
        out[:, :, call.q0 : call.q1] = F.scaled_dot_product_attention(q[:, :, call.q0 : call.q1], kb, vb, scale=1.0)
    return out


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
