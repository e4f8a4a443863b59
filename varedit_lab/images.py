"""Small image utilities: [-1, 1] tensors <-> uint8 / PIL, grids, files."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8, as the release converts (clamp, truncate)."""
    x = (images.detach().float().clamp(-1, 1) + 1) / 2 * 255
    return x.to(torch.uint8).permute(0, 2, 3, 1).cpu()


def from_pil(image: Image.Image, size: int | None = None) -> torch.Tensor:
    """PIL image -> (3, H, W) float in [-1, 1] (optionally resized to ``size`` x ``size``)."""
    image = image.convert("RGB")
    if size is not None and image.size != (size, size):
        image = image.resize((size, size), Image.BICUBIC)
    array = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float()
    return array / 127.5 - 1


def image_grid(rows: Sequence[torch.Tensor], pad: int = 2) -> torch.Tensor:
    """Rows of images, each (B, 3, H, W) in [-1, 1], laid out as a (3, R*(H+pad), B*(W+pad)) grid."""
    lines = []
    for row in rows:
        padded = torch.nn.functional.pad(row.float().clamp(-1, 1), (0, pad, 0, pad), value=1.0)
        lines.append(torch.cat(list(padded), dim=2))
    return torch.cat(lines, dim=1)


def save_image(image: torch.Tensor, path: str | Path) -> Path:
    """Save a (3, H, W) [-1, 1] tensor as PNG."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(to_uint8(image.unsqueeze(0))[0].numpy()).save(path)
    return path
