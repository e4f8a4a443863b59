"""Transformer building blocks with the released parameter names (leaf names match checkpoints).

Only the block container name differs from the release (``blocks.{i}`` here, ``block_chunks.{c}.
module.{j}`` there); :mod:`varedit_lab.model.compat` maps between them.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from varedit_lab.model.attention import AttentionContext, self_attention

MAX_SCALE_MUL = math.log(100.0)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (2p, 2p+1) of ``x`` (..., N, D) by angles with cos/sin (N, D/2)."""
    pairs = x.unflatten(-1, (-1, 2))
    a, b = pairs[..., 0], pairs[..., 1]
    return torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2)


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

    def qkv(self, x: torch.Tensor, ctx: AttentionContext) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Normalised, rotated q and k and projected v, each (B, H, N, D)."""
        b, n, c = x.shape
        bias = torch.cat((self.q_bias, torch.zeros_like(self.q_bias), self.v_bias))
        qkv = F.linear(x, self.mat_qkv.weight, bias).view(b, n, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        scale = self.scale_mul_1H11.clamp_max(MAX_SCALE_MUL).exp()
        q = F.normalize(q, dim=-1, eps=1e-12) * scale
        k = F.normalize(k, dim=-1, eps=1e-12)
        return apply_rope(q, ctx.cos, ctx.sin), apply_rope(k, ctx.cos, ctx.sin), v

    def forward(self, x: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        q, k, v = self.qkv(x, ctx)
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

    def forward(self, x: torch.Tensor | None, text: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """``x`` (B, N, C) or None for the pool; ``text`` (B, L, kv_dim); ``text_mask`` (B, 1, 1, L) bool."""
        b, l, _ = text.shape
        bias = torch.cat((torch.zeros_like(self.v_bias), self.v_bias))
        kv = F.linear(text, self.mat_kv.weight, bias).view(b, l, 2, self.num_heads, self.head_dim)
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)
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
        return F.layer_norm(x, (self.width,), eps=self.norm_eps).mul(scale.add(1)).add_(shift)

    def forward(
        self,
        x: torch.Tensor,
        gss: torch.Tensor,
        text: torch.Tensor,
        text_mask: torch.Tensor,
        ctx: AttentionContext,
        keep: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``gss`` (B, 1, 6, C): the shared AdaLN output. Rows before ``ctx.query_from`` only feed
        keys/values: the output keeps rows from there on."""
        gamma1, gamma2, scale1, scale2, shift1, shift2 = (self.ada_gss + gss).unbind(2)
        attn = self.sa(self._modulate(x, scale1, shift1), ctx)
        skip = max(ctx.query_from - ctx.start, 0)
        if skip:
            x = x[:, skip:]
            if x.shape[1] == 0:
                return x
        x = x + drop_path(attn.mul_(gamma1), keep)
        x = x + self.ca(self.ca_norm(x), text, text_mask)
        x = x + drop_path(self.ffn(self._modulate(x, scale2, shift2)).mul(gamma2), keep)
        return x


class AdaLNBeforeHead(nn.Module):
    def __init__(self, width: int, norm_eps: float = 1e-6):
        super().__init__()
        self.width, self.norm_eps = width, norm_eps
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        scale, shift = self.ada_lin(cond).view(-1, 1, 2, self.width).unbind(2)
        return F.layer_norm(x, (self.width,), eps=self.norm_eps).mul(scale.add(1)).add_(shift)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True).add_(self.eps)) * self.weight
