"""The VAREdit / Infinity transformer: executes any conditioning plan, teacher-forced or cached.

Numerics follow the release (``reference-model.md``): text RMSNorm -> attentive pool (SOS, AdaLN
condition) and MLP (cross-attention keys/values); shared + per-block AdaLN; cosine self-attention with
2-D RoPE; ungated cross-attention; AdaLN head producing two logits per bit. What the model does
*not* know is the conditioning strategy: the plan brings the source tokens, their levels and RoPE
positions, and the per-layer visibility.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from conditioning.base import ConditioningPlan, SequenceLayout
from varedit_lab.model.attention import ATTENTION_IMPLS, AttentionContext, KVCache
from varedit_lab.model.blocks import AdaLNBeforeHead, BlockConstants, CrossAttention, CrossAttnBlock, RMSNorm, rope_angles
from varedit_lab.model.layout import NUM_LEVELS
from varedit_lab.model.quant import CodeAccumulator
from varedit_lab.model.sampling import sample_bits


@dataclass(frozen=True)
class TransformerConfig:
    depth: int
    width: int
    num_heads: int
    mlp_hidden: int
    text_channels: int  # Ct5
    text_maxlen: int  # rows of cfg_uncond
    codebook_dim: int  # d: bits per VAE position
    patchify: bool = False  # 2x2 spatial patchify: tokens carry 4d bits
    drop_path_rate: float = 0.0
    cond_drop_rate: float = 0.1
    attention: str = "blockwise"
    activation_checkpointing: bool = False
    block_chunks: int = 1  # checkpoint naming only: blocks are saved as block_chunks.{c}.module.{j}
    norm_eps: float = 1e-6

    def __post_init__(self):
        if self.width % self.num_heads:
            raise ValueError(f"width {self.width} is not divisible by num_heads {self.num_heads}")
        if self.attention not in ATTENTION_IMPLS:
            raise ValueError(f"attention={self.attention!r}; valid choices: {list(ATTENTION_IMPLS)}")
        if self.depth % self.block_chunks:
            raise ValueError(f"depth {self.depth} is not divisible by block_chunks {self.block_chunks}")

    @property
    def token_channels(self) -> int:
        """d': channels of a transformer token (4d with patchify)."""
        return self.codebook_dim * (4 if self.patchify else 1)

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads

    @property
    def text_pool_heads(self) -> int:
        # The release pools T5 features with heads of 128 channels of Ct5 (64 above width 4096).
        return max(1, self.text_channels // (64 if self.width > 4096 else 128))


@dataclass
class TextFeatures:
    """Per-sample text features, right-padded: ``features`` (B, L, Ct5), ``lengths`` (B,)."""

    features: torch.Tensor
    lengths: torch.Tensor

    def to(self, device) -> "TextFeatures":
        return TextFeatures(self.features.to(device), self.lengths.to(device))

    def __len__(self) -> int:
        return self.features.shape[0]


@dataclass
class TextContext:
    cond: torch.Tensor  # (B, C): pooled text (SOS and AdaLN condition)
    gss: torch.Tensor  # (B, 1, 6, C): shared AdaLN output
    kv: torch.Tensor  # (B, L, C): cross-attention key/value input
    mask: torch.Tensor  # (B, 1, 1, L) bool: valid text rows
    # Cached inference: per-block and head constants of this text, computed once per edit.
    blocks: list[BlockConstants] | None = None
    head: tuple[torch.Tensor, torch.Tensor] | None = None


@dataclass
class Generation:
    bits: list[torch.Tensor]  # per scale (B, n_s, d') uint8
    logits: list[torch.Tensor]  # per scale (B, n_s, V) guided logits (after 1/tau and CFG)
    summed_codes: torch.Tensor  # (B, d, H, W): decoder input


class VAREditTransformer(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.cfg = cfg
        c, ct5 = cfg.width, cfg.text_channels
        init_std = math.sqrt(1 / c / 3)
        uncond = torch.empty(cfg.text_maxlen, ct5)
        nn.init.trunc_normal_(uncond, std=1.2, generator=torch.Generator().manual_seed(0))
        self.cfg_uncond = nn.Parameter(uncond / ct5**0.5)
        self.text_norm = RMSNorm(ct5, eps=cfg.norm_eps)
        self.text_proj_for_sos = nn.Module()
        self.text_proj_for_sos.ca = CrossAttention(c, ct5, cfg.text_pool_heads, pool=True)
        self.text_proj_for_ca = nn.Sequential(nn.Linear(ct5, c), nn.GELU(approximate="tanh"), nn.Linear(c, c))
        self.pos_start = nn.Parameter(torch.empty(1, 1, c))
        nn.init.trunc_normal_(self.pos_start, std=init_std)
        self.lvl_embed = nn.Embedding(NUM_LEVELS, c)
        nn.init.trunc_normal_(self.lvl_embed.weight, std=init_std)
        self.word_embed = nn.Linear(cfg.token_channels, c)
        self.shared_ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(c, 6 * c))
        self.blocks = nn.ModuleList(CrossAttnBlock(c, cfg.num_heads, cfg.mlp_hidden, i, cfg.norm_eps) for i in range(cfg.depth))
        self.head_nm = AdaLNBeforeHead(c, cfg.norm_eps)
        self.head = nn.Linear(c, 2 * cfg.token_channels)
        self._rope: dict[tuple[SequenceLayout, torch.device], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    # ------------------------------------------------------------------------------------------
    # text
    def uncond_text(self, text: TextFeatures) -> TextFeatures:
        """The learned unconditional text of the same lengths (``cfg_uncond[:len]``)."""
        length = text.features.shape[1]
        self._check_text_length(length)
        feats = self.cfg_uncond[:length].unsqueeze(0).expand(len(text), -1, -1)
        valid = torch.arange(length, device=feats.device)[None, :, None] < text.lengths[:, None, None]
        return TextFeatures(feats * valid, text.lengths)

    def _check_text_length(self, length: int) -> None:
        if length > self.cfg.text_maxlen:
            raise ValueError(f"text has {length} tokens; the model holds {self.cfg.text_maxlen} (text.max_length <= model.text_maxlen)")

    def encode_text(self, text: TextFeatures, drop: torch.Tensor | None = None) -> TextContext:
        """Text path. ``drop`` (B,) bool replaces those samples by the unconditional text (out of place)."""
        feats = text.features.float()
        if drop is not None:
            # Also when no sample is dropped (same values): cfg_uncond then still receives a (zero)
            # gradient, so DDP/FSDP never see a trainable parameter without one in some steps, and
            # there is no host sync on drop.any().
            feats = torch.where(drop.view(-1, 1, 1), self.uncond_text(text).features, feats)
        mask = (torch.arange(feats.shape[1], device=feats.device)[None, :] < text.lengths[:, None]).view(len(text), 1, 1, -1)
        normed = self.text_norm(feats)
        cond = self.text_proj_for_sos.ca(None, normed, mask).squeeze(1).float()
        kv = self.text_proj_for_ca(normed)
        gss = self.shared_ada_lin(cond).view(-1, 1, 6, self.cfg.width)
        return TextContext(cond, gss, kv, mask)

    # ------------------------------------------------------------------------------------------
    # blocks
    def rope(self, layout: SequenceLayout, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """cos, sin (L, D/2) and cos + i sin of the layout's positions (built once per layout)."""
        key = (layout, device)
        if key not in self._rope:
            cos, sin = rope_angles(layout.positions, self.cfg.head_dim)
            cos, sin = cos.to(device), sin.to(device)
            self._rope[key] = (cos, sin, torch.complex(cos, sin))
        return self._rope[key]

    def run_blocks(
        self,
        x: torch.Tensor,
        layout: SequenceLayout,
        text: TextContext,
        blocks: tuple[int, int],
        cache: KVCache | None = None,
        keep: torch.Tensor | None = None,
        outputs_from: int = 0,
    ) -> torch.Tensor:
        """Run sequence blocks ``[blocks[0], blocks[1])`` (embedded as ``x``) through every layer.

        Returns hidden states of the tokens from ``outputs_from`` (a sequence index) on: the last
        layer skips everything but the key/value projection for earlier tokens.
        """
        cos, sin, cis = self.rope(layout, x.device)
        start = layout.block_starts[blocks[0]]
        end = layout.block_range(blocks[1] - 1)[1]
        ctx = AttentionContext(
            layout, cos[start:end], sin[start:end], blocks[0], blocks[1], self.cfg.attention, cache, cis=cis[start:end]
        )
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            layer_ctx = dataclasses.replace(ctx, query_from=outputs_from) if i == last and outputs_from > start else ctx
            keep_i = None if keep is None else keep[i]
            if self.cfg.activation_checkpointing and self.training:
                x = checkpoint(block, x, text.gss, text.kv, text.mask, layer_ctx, keep_i, use_reentrant=False)
            else:
                consts = text.blocks[i] if text.blocks is not None else None
                x = block(x, text.gss, text.kv, text.mask, layer_ctx, keep_i, consts)
        return x

    def logits(self, hidden: torch.Tensor, cond: torch.Tensor, modulation: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        return self.head(self.head_nm(hidden.float(), cond.float(), modulation))

    # ------------------------------------------------------------------------------------------
    # training
    def draw_noise(self, batch: int, generator: torch.Generator | None, device) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Pre-draw text drop (B,) and drop-path keep scales (depth, B) so that activation
        checkpointing recomputes the same forward."""
        drop = keep = None
        if self.cfg.cond_drop_rate > 0:
            drop = torch.rand(batch, generator=generator) < self.cfg.cond_drop_rate
            drop = drop.to(device)
        if self.cfg.drop_path_rate > 0:
            rates = torch.linspace(0, self.cfg.drop_path_rate, self.cfg.depth)
            survive = 1 - rates[:, None]
            keep = (torch.rand(self.cfg.depth, batch, generator=generator) < survive).float() / survive
            keep = keep.to(device)
        return drop, keep

    def forward(
        self,
        plan: ConditioningPlan,
        teacher_inputs: torch.Tensor,
        text: TextFeatures,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Teacher-forced logits (B, T, 2d') of every target scale at once.

        ``teacher_inputs`` (B, T - n_0, d') are the inputs of scales 1..K-1 (scale 0's is the SOS).
        Text dropout and drop path apply in training mode only, drawn from ``generator``.
        """
        layout = plan.layout
        drop, keep = self.draw_noise(len(text), generator, teacher_inputs.device) if self.training else (None, None)
        tctx = self.encode_text(text, drop)
        sos = tctx.cond.unsqueeze(1) + self.pos_start
        x = torch.cat([self.word_embed(plan.source_tokens.float()), sos, self.word_embed(teacher_inputs.float())], dim=1)
        x = x + self.lvl_embed(layout.levels.to(x.device))
        n_src = layout.num_source_tokens
        hidden = self.run_blocks(x, layout, tctx, (0, layout.num_blocks), keep=keep, outputs_from=n_src)
        return self.logits(hidden, tctx.cond)

    # ------------------------------------------------------------------------------------------
    # inference
    @torch.no_grad()
    def generate(
        self,
        plan: ConditioningPlan,
        text: TextFeatures,
        cfg: float | Sequence[float] = 4.0,
        tau: float | Sequence[float] = 0.5,
        top_k: int = 0,
        top_p: float = 0.0,
        greedy: bool = False,
        generator: torch.Generator | None = None,
        forced_bits: Sequence[torch.Tensor] | None = None,
        use_cache: bool = True,
    ) -> Generation:
        """Scale-by-scale decoding with a KV cache and classifier-free guidance on logits.

        The source is prefilled once for both CFG branches (each with its own text, so their cached
        source keys differ); CFG drops the text only. Works for any batch size. ``forced_bits``
        feeds given bits instead of sampled ones (teacher-forced cached inference).
        ``use_cache=False`` is the no-KV-cache baseline: every scale re-runs the teacher-forced
        forward of the whole prefix (source and target scales so far); same result, far more work.
        """
        layout, schedule = plan.layout, plan.layout.schedule
        k = schedule.num_scales
        cfgs = _per_scale(cfg, k, "cfg")
        taus = _per_scale(tau, k, "tau")
        batch = plan.source_tokens.shape[0]
        guided = any(c != 1 for c in cfgs)
        if guided:
            uncond = self.uncond_text(text)
            text = TextFeatures(torch.cat([text.features.float(), uncond.features]), torch.cat([text.lengths, uncond.lengths]))
            plan = plan.repeat(2)
        branches = 2 if guided else 1
        tctx = self.encode_text(text)
        tctx.blocks = [block.constants(tctx.gss, tctx.kv) for block in self.blocks]
        tctx.head = self.head_nm.modulation(tctx.cond.float())
        device = plan.source_tokens.device
        n_src_blocks = layout.num_source_blocks
        src = self.word_embed(plan.source_tokens.float()) + self.lvl_embed(layout.levels[: layout.num_source_tokens].to(device))
        cache = None
        if use_cache:
            cache = KVCache.allocate(
                self.cfg.depth, batch * branches, self.cfg.num_heads, layout.length, self.cfg.head_dim, device, torch.float32
            )
            if n_src_blocks:  # a plan without source tokens (text_only) has nothing to prefill
                self.run_blocks(src, layout, tctx, (0, n_src_blocks), cache=cache, outputs_from=layout.num_source_tokens)
        prefix = [src]  # without a cache: the embedded sequence so far

        acc = CodeAccumulator(schedule, self.cfg.patchify, self.cfg.codebook_dim, batch, device)
        x = tctx.cond.unsqueeze(1) + self.pos_start
        all_bits, all_logits = [], []
        for s in range(k):
            block = n_src_blocks + s
            start, end = layout.block_range(block)
            x = x + self.lvl_embed(layout.levels[start:end].to(device))
            if use_cache:
                hidden = self.run_blocks(x, layout, tctx, (block, block + 1), cache=cache)
            else:
                # The teacher-forced forward of the prefix (all of its target rows), as a model
                # without a KV cache runs it; the logits of scale s are its last rows.
                prefix.append(x)
                n_src = layout.num_source_tokens
                hidden = self.run_blocks(torch.cat(prefix, dim=1), layout, tctx, (0, block + 1), outputs_from=n_src)[:, start - n_src :]
            logits = self.logits(hidden, tctx.cond, tctx.head) / taus[s]
            if guided:
                logits = cfgs[s] * logits[:batch] + (1 - cfgs[s]) * logits[batch:]
            bits = forced_bits[s].to(device) if forced_bits is not None else sample_bits(logits, top_k, top_p, greedy, generator)
            all_bits.append(bits.to(torch.uint8))
            all_logits.append(logits)
            nxt = acc.add(s, bits)
            if nxt is not None:
                x = self.word_embed(nxt).repeat(branches, 1, 1)
        return Generation(all_bits, all_logits, acc.summed)


def _per_scale(value: float | Sequence[float], k: int, name: str) -> list[float]:
    if isinstance(value, (int, float)):
        return [float(value)] * k
    values = [float(v) for v in value]
    if len(values) < k:
        raise ValueError(f"{name} has {len(values)} values for {k} scales")
    return values
