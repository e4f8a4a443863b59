"""Sampling of bits from guided logits (2-way categorical per bit)."""

from __future__ import annotations

import torch


def sample_bits(
    logits: torch.Tensor,
    top_k: int = 0,
    top_p: float = 0.0,
    greedy: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Bits (B, n, d') from logits (B, n, 2d'); logit 2j + b is bit j taking value b.

    The rules of the release: ``top_k >= 2`` is a no-op on two classes (``top_k == 1`` is greedy);
    ``top_p`` drops the minority class when its probability is <= 1 - top_p; one multinomial draw
    over all (token, bit) rows. ``greedy`` takes the argmax (ties give 0).
    """
    b, n, v = logits.shape
    pairs = logits.float().reshape(b, n, v // 2, 2)
    if greedy or top_k == 1:
        return (pairs[..., 1] > pairs[..., 0]).to(torch.uint8)
    if top_p > 0:
        probs = pairs.softmax(dim=-1)
        minority = probs.min(dim=-1, keepdim=True)
        drop = (minority.values <= 1 - top_p) & (probs == minority.values)
        # Never drop both classes of a tie: keep index 1 where the two are equal.
        drop[..., 1] &= ~(probs[..., 0] == probs[..., 1])
        pairs = pairs.masked_fill(drop, float("-inf"))
    probs = pairs.softmax(dim=-1).reshape(-1, 2)
    return torch.multinomial(probs, 1, generator=generator).view(b, n, v // 2).to(torch.uint8)
