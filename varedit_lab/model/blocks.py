"""Transformer building blocks with the released parameter names (leaf names match checkpoints).

Only the block container name differs from the release (``blocks.{i}`` here, ``block_chunks.{c}.
module.{j}`` there); :mod:`varedit_lab.model.compat` maps between them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from varedit_lab.model.attention import AttentionContext, self_attention

MAX_SCALE_MUL = math.log(100.0)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (2p, 2p+1) of ``x`` (..., N, D) by angles with cos/sin (N, D/2)."""
    return rotate(x, torch.complex(cos, sin))


def rotate(x: torch.Tensor, cis: torch.Tensor) -> torch.Tensor:
    """RoPE as one complex multiply: pair (a, b) times ``cos + i sin`` gives (a cos - b sin,
    a sin + b cos), bit-identical to the real formula (the CPU kernel rounds each product and then
    adds, like the separate ops) and ~20x faster than strided pair slicing plus ``stack``.
    ``x`` (..., D) needs a contiguous last dimension; ``cis`` broadcasts against (..., D/2)."""
    pairs = torch.view_as_complex(x.unflatten(-1, (-1, 2)))
    return torch.view_as_real(pairs * cis).flatten(-2)


def _normalize_scale_rotate(x: torch.Tensor, scale: torch.Tensor | None, cis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``rotate(normalize(x) * scale, cis)`` with the exact op sequence of ``F.normalize``; also
    returns the normalised ``x`` and the clamped norm (what the backward needs)."""
    denom = torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min_(1e-12)
    unit = x / denom
    return rotate(unit * scale if scale is not None else unit, cis), unit, denom


class _NormalizeScaleRotate(torch.autograd.Function):
    """Cosine-attention q/k prep with a hand-derived backward.

    Autograd through ``F.normalize``, the per-head scale and the rotation runs about ten passes
    over q (and k) per layer; with ``u = x/|x|``, ``g = R^-1 dy`` (rotation by the conjugate):
    ``dscale = sum(g . u)``, ``dx = (s g - u (s g . u)) / |x|`` takes five.
    """

    @staticmethod
    def forward(ctx, x, scale, cis):
        y, unit, denom = _normalize_scale_rotate(x, scale, cis)
        ctx.save_for_backward(unit, denom, scale, cis)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        unit, denom, scale, cis = ctx.saved_tensors
        g = rotate(grad, cis.conj())
        dot = (g * unit).sum(-1, keepdim=True)  # d loss / d(|x| * scale) per token and head
        dscale = None
        if scale is not None:
            if ctx.needs_input_grad[1]:
                dims = tuple(i for i, n in enumerate(scale.shape) if n == 1)
                dscale = dot.sum(dim=dims, keepdim=True)
            g, dot = g * scale, dot * scale
        # Where |x| was clamped to eps the clamp has no gradient: dx = g / eps.
        tangent = torch.where(denom > 1e-12, dot, 0.0)
        return (g - unit * tangent) / denom, dscale, None


def normalize_scale_rotate(x: torch.Tensor, scale: torch.Tensor | None, cis: torch.Tensor) -> torch.Tensor:
    """``rotate(F.normalize(x, dim=-1, eps=1e-12) * scale, cis)``, bit-identical in the forward.

    Computed in float32 whatever the input dtype (the release keeps q and k in fp32 after the
    normalisation and RoPE, also under bf16 autocast)."""
    x = x.float()
    if torch.is_grad_enabled() and (x.requires_grad or (scale is not None and scale.requires_grad)):
        return _NormalizeScaleRotate.apply(x, scale, cis)
    return _normalize_scale_rotate(x, scale, cis)[0]


def rope_angles(positions: torch.Tensor, head_dim: int, base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin (N, head_dim/2) of 2-D positions (N, 2): the first half of the pairs rotate by
    row * theta_j, the second half by col * theta_j, theta_j = base^(-2j / (head_dim/2)) (float32)."""
    half = head_dim // 2
    inv_freq = 1.0 / (base ** (torch.arange(0, half, 2, dtype=torch.int64).float() / half))
    pos = positions.float()
    angles = torch.cat([pos[:, :1] * inv_freq, pos[:, 1:] * inv_freq], dim=-1)
    return angles.cos(), angles.sin()


def drop_path(x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """Stochastic depth with a pre-drawn per-sample keep mask (B,) already divided by keep prob."""
    return x if keep is None else x * keep.view(-1, 1, 1)


class SelfAttention(nn.Module):
    """Cosine self-attention with a learned per-head scale and 2-D RoPE (the released ``sa``)."""

    def __init__(self, width: int, num_heads: int, layer_index: int):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, width // num_heads
        self.layer_index = layer_index
        self.scale_mul_1H11 = nn.Parameter(torch.full((1, num_heads, 1, 1), math.log(4.0)))
        self.mat_qkv = nn.Linear(width, 3 * width, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(width))
        self.v_bias = nn.Parameter(torch.zeros(width))
        self.proj = nn.Linear(width, width)
        self.probe = None  # set by varedit_lab.probes while attached; None costs one attribute read

    def constants(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The qkv bias ``[q_bias, 0, v_bias]`` and the per-head query scale (1, 1, H, 1)."""
        bias = torch.cat((self.q_bias, torch.zeros_like(self.q_bias), self.v_bias))
        return bias, self.scale_mul_1H11.clamp_max(MAX_SCALE_MUL).exp().transpose(1, 2)

    def qkv(
        self, x: torch.Tensor, ctx: AttentionContext, consts: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Normalised, rotated q and k and projected v, each (B, H, N, D).

        They are (B, H, N, D) views of (B, N, H, D) memory: the projection output is never permuted
        into a copy (SDPA reads any strides and returns its output in the query's layout, so the
        output projection needs no copy either, and neither do the backward passes)."""
        b, n, c = x.shape
        bias, scale = consts if consts is not None else self.constants()
        q, k, v = F.linear(x, self.mat_qkv.weight, bias).view(b, n, 3, self.num_heads, self.head_dim).unbind(2)
        cis = ctx.rope_cis.unsqueeze(1)  # (N, 1, D/2): the same rotation for every head
        q = normalize_scale_rotate(q, scale, cis)
        k = normalize_scale_rotate(k, None, cis)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def forward(self, x: torch.Tensor, ctx: AttentionContext, consts: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        q, k, v = self.qkv(x, ctx, consts)
        if self.probe is not None:
            out = self.probe(self, q, k, v, ctx)
        else:
            out = self_attention(q, k, v, self.layer_index, ctx)
        return self.proj(out.transpose(1, 2).flatten(2))


class CrossAttention(nn.Module):
    """Attention to the text (``ca`` in blocks; ``text_proj_for_sos.ca`` as the attentive pool).

    Keys/values come from ``mat_kv`` (no k-bias, learned v-bias); padding rows are masked per sample.
    As the pool (``pool=True``) the query is the learned ``mat_q`` parameter (1, H, D).
    """

    def __init__(self, width: int, kv_dim: int, num_heads: int, pool: bool = False):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, width // num_heads
        if pool:
            self.mat_q = nn.Parameter(torch.empty(1, num_heads, self.head_dim))
            nn.init.trunc_normal_(self.mat_q, std=math.sqrt(1 / width / 3))
        else:
            self.mat_q = nn.Linear(width, width)
        self.mat_kv = nn.Linear(kv_dim, 2 * width, bias=False)
        self.v_bias = nn.Parameter(torch.zeros(width))
        self.proj = nn.Linear(width, width)

    def text_kv(self, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values (B, H, L, D) of the text (constant over an edit's scales)."""
        b, l, _ = text.shape
        bias = torch.cat((torch.zeros_like(self.v_bias), self.v_bias))
        kv = F.linear(text, self.mat_kv.weight, bias).view(b, l, 2, self.num_heads, self.head_dim)
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)
        return k, v

    def forward(
        self,
        x: torch.Tensor | None,
        text: torch.Tensor,
        text_mask: torch.Tensor,
        kv: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """``x`` (B, N, C) or None for the pool; ``text`` (B, L, kv_dim); ``text_mask`` (B, 1, 1, L) bool.
        ``kv``: precomputed ``text_kv(text)``."""
        b = text.shape[0]
        k, v = kv if kv is not None else self.text_kv(text)
        if x is None:
            q = self.mat_q.unsqueeze(2).expand(b, -1, -1, -1)  # (B, H, 1, D)
        else:
            q = self.mat_q(x).view(b, x.shape[1], self.num_heads, self.head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=text_mask)
        return self.proj(out.transpose(1, 2).flatten(2))


class FFN(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


@dataclass
class BlockConstants:
    """What a block computes from the text and its weights alone: once per edit instead of once
    per scale (the release recomputes all of it, text keys/values included, at every scale)."""

    gamma1: torch.Tensor  # (B, 1, C) gates
    gamma2: torch.Tensor
    scale1: torch.Tensor  # (B, 1, C) AdaLN scales, already 1 + scale
    scale2: torch.Tensor
    shift1: torch.Tensor
    shift2: torch.Tensor
    attn: tuple[torch.Tensor, torch.Tensor]  # SelfAttention.constants()
    text_kv: tuple[torch.Tensor, torch.Tensor]  # CrossAttention.text_kv(text)


class CrossAttnBlock(nn.Module):
    """Pre-norm block: AdaLN-modulated self-attention, ungated cross-attention, AdaLN FFN."""

    def __init__(self, width: int, num_heads: int, mlp_hidden: int, layer_index: int, norm_eps: float = 1e-6):
        super().__init__()
        self.width, self.norm_eps = width, norm_eps
        self.ada_gss = nn.Parameter(torch.randn(1, 1, 6, width) / width**0.5)
        self.sa = SelfAttention(width, num_heads, layer_index)
        self.ca = CrossAttention(width, width, num_heads)
        self.ffn = FFN(width, mlp_hidden)
        self.ca_norm = nn.LayerNorm(width, eps=norm_eps)

    def _modulate(self, x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        """``LN(x) * scale + shift`` (``scale`` already holds 1 + scale)."""
        return F.layer_norm(x, (self.width,), eps=self.norm_eps).mul(scale).add_(shift)

    def constants(self, gss: torch.Tensor, text: torch.Tensor) -> BlockConstants:
        """``gss`` (B, 1, 6, C): the shared AdaLN output; ``text`` (B, L, C): cross-attention input."""
        gamma1, gamma2, scale1, scale2, shift1, shift2 = (self.ada_gss + gss).unbind(2)
        return BlockConstants(gamma1, gamma2, scale1.add(1), scale2.add(1), shift1, shift2, self.sa.constants(), self.ca.text_kv(text))

    def forward(
        self,
        x: torch.Tensor,
        gss: torch.Tensor,
        text: torch.Tensor,
        text_mask: torch.Tensor,
        ctx: AttentionContext,
        keep: torch.Tensor | None = None,
        consts: BlockConstants | None = None,
    ) -> torch.Tensor:
        """``gss`` (B, 1, 6, C): the shared AdaLN output. Rows before ``ctx.query_from`` only feed
        keys/values: the output keeps rows from there on. ``consts``: precomputed
        ``constants(gss, text)`` (cached inference)."""
        c = consts if consts is not None else self.constants(gss, text)
        attn = self.sa(self._modulate(x, c.scale1, c.shift1), ctx, c.attn)
        skip = max(ctx.query_from - ctx.start, 0)
        if skip:
            x = x[:, skip:]
            if x.shape[1] == 0:
                return x
        x = x + drop_path(attn * c.gamma1, keep)  # out of place: compiled blocks save attn for backward
        x = x + self.ca(self.ca_norm(x), text, text_mask, c.text_kv)
        x = x + drop_path(self.ffn(self._modulate(x, c.scale2, c.shift2)).mul(c.gamma2), keep)
        return x


class AdaLNBeforeHead(nn.Module):
    def __init__(self, width: int, norm_eps: float = 1e-6):
        super().__init__()
        self.width, self.norm_eps = width, norm_eps
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def modulation(self, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(1 + scale, shift), each (B, 1, C), of the condition (constant over an edit's scales)."""
        scale, shift = self.ada_lin(cond).view(-1, 1, 2, self.width).unbind(2)
        return scale.add(1), shift

    def forward(self, x: torch.Tensor, cond: torch.Tensor, modulation: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        scale, shift = modulation if modulation is not None else self.modulation(cond)
        return F.layer_norm(x, (self.width,), eps=self.norm_eps).mul(scale).add_(shift)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True).add_(self.eps)) * self.weight
