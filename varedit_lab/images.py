"""Small image utilities: [-1, 1] tensors <-> uint8 / PIL, grids, files."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

EDIT_COLUMNS = ("source", "target", "edit")


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


def labelled_grid(columns: Sequence[torch.Tensor], captions: Sequence[str], headers: Sequence[str] = EDIT_COLUMNS,
                  min_cell: int = 128, pad: int = 6, font_size: int = 14) -> Image.Image:
    """One row per sample: ``columns[c][i]`` side by side under the column ``headers``, with the
    sample's caption (its instruction) written under its row. ``columns`` are (B, 3, H, W) tensors
    in [-1, 1]; small images are enlarged (nearest) to at least ``min_cell`` pixels."""
    if len(columns) != len(headers):
        raise ValueError(f"{len(columns)} image columns but {len(headers)} headers {list(headers)}")
    rows = columns[0].shape[0]
    if len(captions) != rows:
        raise ValueError(f"{rows} rows of images but {len(captions)} captions")
    height, width = columns[0].shape[-2:]
    zoom = max(1, math.ceil(min_cell / max(height, width)))
    cell_w, cell_h = width * zoom, height * zoom
    font = ImageFont.load_default(size=font_size)
    line_h = font_size + 4
    grid_w = len(columns) * cell_w + (len(columns) + 1) * pad
    wrapped = [textwrap.wrap(str(c), max(8, int((grid_w - 2 * pad) / font.getlength("n")))) or [""] for c in captions]
    header_h = line_h + pad
    total_h = header_h + sum(cell_h + len(lines) * line_h + 2 * pad for lines in wrapped) + pad
    canvas = Image.new("RGB", (grid_w, total_h), "white")
    draw = ImageDraw.Draw(canvas)
    for c, header in enumerate(headers):
        draw.text((pad + c * (cell_w + pad), pad // 2), header, fill="black", font=font)
    y = header_h
    tiles = [to_uint8(col).numpy() for col in columns]
    for i, lines in enumerate(wrapped):
        for c, tile in enumerate(tiles):
            image = Image.fromarray(tile[i]).resize((cell_w, cell_h), Image.NEAREST)
            canvas.paste(image, (pad + c * (cell_w + pad), y))
        y += cell_h + pad // 2
        for line in lines:
            draw.text((pad, y), line, fill="black", font=font)
            y += line_h
        y += pad + pad // 2
    return canvas


def save_image(image: torch.Tensor | Image.Image, path: str | Path) -> Path:
    """Save a (3, H, W) [-1, 1] tensor or a PIL image as PNG."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(image, torch.Tensor):
        image = Image.fromarray(to_uint8(image.unsqueeze(0))[0].numpy())
    image.save(path)
    return path
