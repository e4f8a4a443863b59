"""Useful model FLOPs of the transformer for a sequence layout (for MFU and benchmark reports).

Only work that contributes to the outputs is counted: 2 x multiply-adds of every projection
(embeddings, text path, AdaLN MLPs, self-/cross-attention projections, FFN, head) and attention over
the *visible* (query, key) pairs of each layer: no padding, no masked-out pairs. SAR's pooled
reference counts as ``n_s`` extra keys for target scale s in its layer (the pooling itself is
averaging, not multiply-adds, and is ignored). Queries whose outputs are never read (the source rows
of the last layer, which only provide keys/values) count only their key/value projections. Norms,
softmax, activations and elementwise work are not counted (the usual MFU convention). A training
step is 3 x the forward (backward = 2 x forward).
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass

from conditioning.base import SequenceLayout
from varedit_lab.model.transformer import TransformerConfig


@dataclass(frozen=True)
class FlopCount:
    """FLOPs of one forward pass of one sample, by part (2 x multiply-adds)."""

    text: float  # RMSNorm-free text path: attentive pool (kv proj, attention, proj), text MLP, AdaLN MLPs
    embed: float  # word_embed of the source tokens and teacher inputs
    attn_proj: float  # self-attention qkv and output projections
    attn_pairs: float  # self-attention q.k and p.v over visible pairs
    cross: float  # cross-attention q/kv/output projections and attention over the text
    ffn: float
    head: float

    @property
    def total(self) -> float:
        return sum(asdict(self).values())

    def scaled(self, factor: float) -> "FlopCount":
        return FlopCount(**{k: v * factor for k, v in asdict(self).items()})

    def as_dict(self) -> dict[str, float]:
        return {**asdict(self), "total": self.total}


def visible_pairs(layout: SequenceLayout, layer: int, query_from: int = 0, num_blocks: int | None = None) -> int:
    """(query, key) pairs attended in ``layer`` by queries at sequence index >= ``query_from`` of
    the first ``num_blocks`` blocks (default: all)."""
    vis = layout.visibility(layer)
    key_sizes = layout.key_block_sizes(vis)
    pairs = 0
    for qb in range(layout.num_blocks if num_blocks is None else num_blocks):
        s, e = layout.block_range(qb)
        n_q = max(0, e - max(s, query_from))
        if n_q:
            row = vis.visible[qb].tolist()
            pairs += n_q * sum(size for size, seen in zip(key_sizes, row) if seen)
    return pairs


def _text_macs(cfg: TransformerConfig, text_len: int) -> int:
    c, ct5 = cfg.width, cfg.text_channels
    return (
        text_len * ct5 * 2 * c  # pool keys/values
        + cfg.text_pool_heads * text_len * (c // cfg.text_pool_heads) * 2  # pool attention (1 query/head)
        + c * c  # pool output projection
        + text_len * (ct5 * c + c * c)  # text_proj_for_ca MLP
        + c * 6 * c  # shared AdaLN
        + c * 2 * c  # head AdaLN
    )


def _prefix_flops(cfg: TransformerConfig, layout: SequenceLayout, text_len: int, num_blocks: int, head_rows: int) -> FlopCount:
    """The teacher-forced forward of the first ``num_blocks`` blocks, with logits for ``head_rows``."""
    c, hid, v = cfg.width, cfg.mlp_hidden, 2 * cfg.token_channels
    n_all, n_src = layout.block_range(num_blocks - 1)[1], layout.num_source_tokens
    n_tgt = n_all - n_src
    last = cfg.depth - 1
    embed = (n_all - 1) * cfg.token_channels * c  # the SOS row is the pooled text, not an embedding
    attn_proj = cross = ffn = pairs = 0
    for layer in range(cfg.depth):
        n_q = n_tgt if layer == last else n_all  # last layer: source rows only give keys/values
        attn_proj += n_q * 4 * c * c + (n_all - n_q) * 2 * c * c
        pairs += visible_pairs(layout, layer, query_from=n_src if layer == last else 0, num_blocks=num_blocks)
        cross += n_q * 2 * c * c + text_len * 2 * c * c + 2 * n_q * text_len * c
        ffn += n_q * 2 * c * hid
    return FlopCount(0, embed, attn_proj, 2 * pairs * c, cross, ffn, head_rows * c * v).scaled(2.0)


def forward_flops(cfg: TransformerConfig, layout: SequenceLayout, text_len: int) -> FlopCount:
    """Useful FLOPs of one teacher-forced forward of one sample with ``text_len`` text tokens.

    Cached inference does the same useful work (every query sees the same keys, each token is
    processed once), so an edit with CFG costs ``forward_flops(...) x 2`` (two branches).
    """
    n_tgt = layout.length - layout.num_source_tokens
    body = _prefix_flops(cfg, layout, text_len, layout.num_blocks, n_tgt)
    return dataclasses.replace(body, text=2.0 * _text_macs(cfg, text_len))


def train_step_flops(cfg: TransformerConfig, layout: SequenceLayout, text_len: int, batch: int) -> float:
    """Forward + backward of a batch: 3 x the forward."""
    return 3.0 * batch * forward_flops(cfg, layout, text_len).total


def edit_flops(cfg: TransformerConfig, layout: SequenceLayout, text_len: int, guided: bool = True) -> float:
    """One cached edit of one image (both CFG branches when ``guided``)."""
    return (2 if guided else 1) * forward_flops(cfg, layout, text_len).total


def recompute_edit_flops(cfg: TransformerConfig, layout: SequenceLayout, text_len: int, guided: bool = True) -> float:
    """One edit without a KV cache: every scale s runs the teacher-forced forward of the prefix
    (source blocks and target scales <= s) and reads the logits of scale s."""
    total = 2.0 * _text_macs(cfg, text_len)
    for s, n in enumerate(layout.schedule.sizes):
        total += _prefix_flops(cfg, layout, text_len, layout.num_source_blocks + s + 1, n).total
    return (2 if guided else 1) * total
