"""The eager attention path: explicit ``softmax(q kᵀ) v`` over exactly the keys the plan makes visible.

The fast executor (:func:`varedit_lab.model.attention.self_attention`) never materialises attention
weights. Probed layers run this function instead; it must return what the fast path returns (tested
to 1e-5), so it follows the same public contract:

* queries ``q`` (B, H, N, D) of the chunk ``[ctx.start, ctx.end)``, already l2-normalised, scaled
  and RoPE-rotated (cosine attention: the softmax scale is 1);
* keys/values of the chunk, written to ``ctx.cache`` when there is one (cached inference then reads
  earlier blocks from the cache);
* each query block sees the key blocks of its row of ``layout.visibility(layer).visible``; extra
  key blocks (SAR's pooled reference) come from ``visibility.extension.compute``;
* outputs (B, H, Nq, D) for the queries from ``max(ctx.start, ctx.query_from)``.

Only the public structure of the plan and context is used, so internal changes of the fast path do
not affect the probe. Weights are computed in float32, in query chunks bounded in bytes.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from conditioning.base import LayerVisibility, SequenceLayout
from varedit_lab.model.attention import AttentionContext

# observer(block, first_row_in_block, probs (B, H, n, K_visible), visible key blocks)
Observer = Callable[[int, int, torch.Tensor, tuple[int, ...]], None]

DEFAULT_CHUNK_BYTES = 64 << 20


def visible_key_blocks(vis: LayerVisibility, block: int) -> tuple[int, ...]:
    """Key blocks (sequence blocks, then ``num_blocks + j`` for extra block j) query ``block`` sees."""
    return tuple(torch.nonzero(vis.visible[block]).flatten().tolist())


def _kv_store(k: torch.Tensor, v: torch.Tensor, layer: int, ctx: AttentionContext) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Where this call's keys live: the KV cache (written first, as the fast path does) or the chunk.

    Returns (keys, values, sequence index of their first row)."""
    if ctx.cache is None:
        return k, v, ctx.start
    ctx.cache.keys[layer][:, :, ctx.start : ctx.end] = k
    ctx.cache.values[layer][:, :, ctx.start : ctx.end] = v
    return ctx.cache.keys[layer], ctx.cache.values[layer], 0


class _KeyGatherer:
    """Key/value tensors of key blocks for one layer call (extra blocks computed once, lazily)."""

    def __init__(self, layout: SequenceLayout, vis: LayerVisibility, k_store: torch.Tensor, v_store: torch.Tensor, offset: int):
        self.layout, self.vis = layout, vis
        self.k_store, self.v_store, self.offset = k_store, v_store, offset
        self.extra: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def sequence_block(self, block: int) -> tuple[torch.Tensor, torch.Tensor]:
        s, e = self.layout.block_range(block)
        if s < self.offset or e - self.offset > self.k_store.shape[2]:
            raise RuntimeError(f"key block {block} [{s}, {e}) is neither cached nor in this chunk")
        return self.k_store[:, :, s - self.offset : e - self.offset], self.v_store[:, :, s - self.offset : e - self.offset]

    def extra_block(self, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        if j not in self.extra:
            needed = set(self.vis.extension.source_blocks(j))
            keys: list[torch.Tensor | None] = [None] * self.layout.num_blocks
            values: list[torch.Tensor | None] = [None] * self.layout.num_blocks
            for b in needed:
                keys[b], values[b] = self.sequence_block(b)
            self.extra[j] = self.vis.extension.compute(j, keys, values)
        return self.extra[j]

    def gather(self, key_blocks: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        nb = self.layout.num_blocks
        pairs = [self.sequence_block(kb) if kb < nb else self.extra_block(kb - nb) for kb in key_blocks]
        if len(pairs) == 1:
            return pairs[0]
        return torch.cat([p[0] for p in pairs], dim=2), torch.cat([p[1] for p in pairs], dim=2)


def eager_self_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layer: int,
    ctx: AttentionContext,
    observer: Observer | None = None,
    max_chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> torch.Tensor:
    """Same inputs and result as ``self_attention``; ``observer`` sees the weights of every query row
    of the chunk (including rows whose outputs are not needed, e.g. the source in the last layer)."""
    # float32 weights even inside an autocast region (bf16 probabilities would not sum to 1).
    with torch.autocast(q.device.type, enabled=False):
        return _eager(q, k, v, layer, ctx, observer, max_chunk_bytes)


def _eager(q, k, v, layer: int, ctx: AttentionContext, observer: Observer | None, max_chunk_bytes: int) -> torch.Tensor:
    layout = ctx.layout
    vis = layout.visibility(layer)
    k_store, v_store, offset = _kv_store(k, v, layer, ctx)
    keys = _KeyGatherer(layout, vis, k_store, v_store, offset)
    first_q = max(ctx.start, ctx.query_from)
    outputs: list[torch.Tensor] = []
    for block in range(ctx.first_block, ctx.last_block):
        s, e = layout.block_range(block)
        if e <= first_q and observer is None:
            continue
        key_blocks = visible_key_blocks(vis, block)
        kb, vb = keys.gather(key_blocks)
        kb_t, vb = kb.float().transpose(-1, -2), vb.float()
        # Scores, probabilities and the exp temporary: ~3 float32 copies per row.
        row_bytes = 12 * q.shape[0] * q.shape[1] * kb.shape[2]
        step = max(1, max_chunk_bytes // max(row_bytes, 1))
        for r0 in range(s if observer is not None else max(s, first_q), e, step):
            r1 = min(e, r0 + step)
            probs = torch.softmax(q[:, :, r0 - ctx.start : r1 - ctx.start].float() @ kb_t, dim=-1)
            if observer is not None:
                observer(block, r0 - s, probs, key_blocks)
            if r1 > first_q:
                outputs.append(probs[:, :, max(r0, first_q) - r0 :] @ vb)
    if not outputs:  # only keys/values were needed
        return q[:, :, q.shape[2] :]
    out = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=2)
    return out.to(q.dtype)
