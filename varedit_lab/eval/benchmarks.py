"""Public editing benchmarks from local copies: EMU-Edit test and PIE-Bench.

Nothing is downloaded: point ``--data`` at a folder laid out as below.

EMU-Edit test (Hugging Face ``facebook/emu_edit_test_set``, exported to a folder)::

    ROOT/
      metadata.jsonl     one JSON object per sample, with the dataset's fields:
                         {"idx": 0, "image": "images/0.png", "instruction": "...",
                          "input_caption": "...", "output_caption": "...", "task": "background",
                          "split": "test"}
                         "image" is the exported source image, relative to ROOT.
      images/            the source images (any format PIL reads)

  Required per record: ``image``, ``instruction``; CLIP-Dir needs both captions, CLIP-Out the
  output caption. ``task`` is the edit kind (background, global, style, remove, add, text, color,
  local); ``split`` can be filtered on.

PIE-Bench (the PnPInversion release, unchanged)::

    ROOT/
      mapping_file.json  {"000000000000": {"image_path": "0_random_140/000000000000.jpg",
                          "original_prompt": "...", "editing_prompt": "... [rusty] ...",
                          "editing_instruction": "...", "editing_type_id": "0",
                          "blended_word": "...", "mask": [start, length, start, length, ...]}, ...}
      annotation_images/ the 700 source images under their image_path

  The mask is a run-length encoding over the row-major flattened 512 x 512 image: pairs
  ``(start, length)`` of pixels set to 1 (the edit region); as in the benchmark's own evaluation,
  the one-pixel image border is set to 1 as well (it guards against annotation errors there).
  Square brackets in the prompts mark the edited words and are removed.

Metrics (see :mod:`varedit_lab.eval.clip_metrics`): L1 always; CLIP-I, CLIP-Out, CLIP-Dir with
``--clip``; DINO with ``--dino``. PIE-Bench adds the paper's CLIP-Whole / CLIP-Edit (CLIPScore scale,
100 * max(cos, 0), of the editing prompt vs the whole edit / the edit masked to the edit region) and
background preservation (PSNR and L1 outside the mask). Every metric is also reported for the
copy-the-source baseline, where defined.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from PIL import Image

PIE_MASK_SHAPE = (512, 512)
PIE_KINDS = {
    "0": "random",
    "1": "change_object",
    "2": "add_object",
    "3": "delete_object",
    "4": "change_content",
    "5": "change_pose",
    "6": "change_color",
    "7": "change_material",
    "8": "change_background",
    "9": "change_style",
}
BENCHMARKS = ("emu_edit", "pie_bench")


@dataclass
class BenchmarkSample:
    """One edit of a public benchmark: the source image path, the instruction and the captions."""

    key: str
    image: Path
    instruction: str
    kind: str
    input_caption: Optional[str] = None
    output_caption: Optional[str] = None
    mask_rle: Optional[list[int]] = field(default=None, repr=False)  # PIE-Bench only

    def load_image(self) -> Image.Image:
        with Image.open(self.image) as handle:
            return handle.convert("RGB")

    def mask(self, size: tuple[int, int]) -> Optional[np.ndarray]:
        """The edit region (H, W) bool at ``size`` = (width, height), or None."""
        if self.mask_rle is None:
            return None
        mask = decode_pie_mask(self.mask_rle, PIE_MASK_SHAPE)
        if (mask.shape[1], mask.shape[0]) != tuple(size):
            mask = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(tuple(size), Image.NEAREST)) >= 128
        return mask


# -------------------------------------------------------------------------------------------------
# PIE-Bench mask
def decode_pie_mask(rle: Sequence[int], shape: tuple[int, int] = PIE_MASK_SHAPE, mark_border: bool = True) -> np.ndarray:
    """PIE-Bench's mask encoding -> (H, W) bool; True = edit region.

    ``rle`` holds pairs ``(start, length)`` over the row-major flattened image; runs past the end are
    clipped. ``mark_border`` sets the outermost rows and columns, as the benchmark's evaluation does.
    """
    if len(rle) % 2:
        raise ValueError(f"PIE-Bench mask: odd number of values ({len(rle)}); expected (start, length) pairs")
    height, width = shape
    flat = np.zeros(height * width, dtype=bool)
    for start, length in zip(rle[0::2], rle[1::2]):
        start, length = int(start), int(length)
        if start < 0 or length < 0:
            raise ValueError(f"PIE-Bench mask: negative run ({start}, {length})")
        flat[start : start + length] = True
    mask = flat.reshape(height, width)
    if mark_border:
        mask[0, :] = mask[-1, :] = True
        mask[:, 0] = mask[:, -1] = True
    return mask


def encode_pie_mask(mask: np.ndarray) -> list[int]:
    """(H, W) bool -> PIE-Bench's (start, length) runs (the inverse of :func:`decode_pie_mask` without border)."""
    flat = np.concatenate([[False], mask.reshape(-1).astype(bool), [False]])
    edges = np.flatnonzero(flat[1:] != flat[:-1])
    starts, ends = edges[0::2], edges[1::2]
    return [int(v) for pair in zip(starts, ends - starts) for v in pair]


# -------------------------------------------------------------------------------------------------
# loaders
def _require(path: Path, what: str, layout: str) -> None:
    if not path.exists():
        raise FileNotFoundError(f"{what} {path} not found; expected layout:\n{layout}")


EMU_LAYOUT = "  ROOT/metadata.jsonl  ({image, instruction, input_caption, output_caption, task, idx, split} per line)\n  ROOT/images/..."
PIE_LAYOUT = "  ROOT/mapping_file.json\n  ROOT/annotation_images/<image_path of each entry>"


def load_emu_edit(root: str | Path, split: str | None = None, limit: int = 0) -> list[BenchmarkSample]:
    """EMU-Edit test records from ``root/metadata.jsonl`` (layout in the module docstring)."""
    root = Path(root)
    meta = root / "metadata.jsonl"
    _require(meta, "EMU-Edit metadata", EMU_LAYOUT)
    samples: list[BenchmarkSample] = []
    for number, line in enumerate(meta.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{meta}:{number}: not JSON ({err.msg})") from None
        missing = [k for k in ("image", "instruction") if not record.get(k)]
        if missing:
            raise ValueError(f"{meta}:{number}: missing {missing}")
        if split is not None and record.get("split") != split:
            continue
        image = root / record["image"]
        _require(image, f"{meta}:{number}: image", EMU_LAYOUT)
        key = str(record.get("idx", number - 1))
        samples.append(BenchmarkSample(key, image, str(record["instruction"]), str(record.get("task") or "unknown"),
                                       record.get("input_caption"), record.get("output_caption")))
        if limit and len(samples) >= limit:
            break
    if not samples:
        raise ValueError(f"{meta}: no samples" + (f" in split {split!r}" if split else ""))
    return samples


def _strip_brackets(text: Optional[str]) -> Optional[str]:
    return text.replace("[", "").replace("]", "") if text is not None else None


def load_pie_bench(root: str | Path, limit: int = 0) -> list[BenchmarkSample]:
    """PIE-Bench records from ``root/mapping_file.json`` (layout in the module docstring)."""
    root = Path(root)
    mapping = root / "mapping_file.json"
    _require(mapping, "PIE-Bench mapping file", PIE_LAYOUT)
    entries = json.loads(mapping.read_text())
    if not isinstance(entries, dict):
        raise ValueError(f"{mapping}: expected an object keyed by sample id")
    samples: list[BenchmarkSample] = []
    for key, entry in entries.items():
        missing = [k for k in ("image_path", "editing_instruction", "mask") if k not in entry]
        if missing:
            raise ValueError(f"{mapping}: entry {key} misses {missing}")
        image = root / "annotation_images" / entry["image_path"]
        _require(image, f"{mapping}: entry {key}: image", PIE_LAYOUT)
        kind_id = str(entry.get("editing_type_id", ""))
        samples.append(BenchmarkSample(
            key=str(key),
            image=image,
            instruction=str(entry["editing_instruction"]),
            kind=PIE_KINDS.get(kind_id, f"type_{kind_id}"),
            input_caption=_strip_brackets(entry.get("original_prompt")),
            output_caption=_strip_brackets(entry.get("editing_prompt")),
            mask_rle=[int(v) for v in entry["mask"]],
        ))
        if limit and len(samples) >= limit:
            break
    if not samples:
        raise ValueError(f"{mapping}: no samples")
    return samples


def load_benchmark(name: str, root: str | Path, limit: int = 0, split: str | None = None) -> list[BenchmarkSample]:
    if name == "emu_edit":
        return load_emu_edit(root, split=split, limit=limit)
    if name == "pie_bench":
        return load_pie_bench(root, limit=limit)
    raise ValueError(f"unknown benchmark {name!r}; choose from {list(BENCHMARKS)}")


# -------------------------------------------------------------------------------------------------
# scoring
def score_pairs(
    sources: Sequence[Image.Image],
    edits: Sequence[Image.Image],
    samples: Sequence[BenchmarkSample],
    clip: Any = None,
    dino: Any = None,
    source_embeddings: dict[str, torch.Tensor] | None = None,
) -> list[dict[str, float]]:
    """Per-sample metrics of ``edits`` against ``sources`` (see the module docstring)."""
    from varedit_lab.eval import clip_metrics as cm

    n = len(samples)
    rows: list[dict[str, float]] = [{"l1": cm.l1_distance(s, e)} for s, e in zip(sources, edits)]
    masks = [sample.mask(source.size) for sample, source in zip(samples, sources)]
    for row, source, edited, mask in zip(rows, sources, edits, masks):
        if mask is not None:
            row["bg_psnr"], row["bg_l1"] = cm.region_psnr_l1(source, edited, ~mask)
    src = source_embeddings or {}
    if clip is not None:
        src_img = src["clip"] if "clip" in src else clip.embed_images(sources)
        edit_img = src_img if edits is sources else clip.embed_images(edits)
        values = {"clip_i": cm.clip_i(src_img, edit_img)}
        out_idx = [i for i, s in enumerate(samples) if s.output_caption]
        if out_idx:
            out_txt = clip.embed_texts([samples[i].output_caption for i in out_idx])
            values["clip_out"] = _scatter(n, out_idx, cm.clip_out(edit_img[out_idx], out_txt))
            dir_idx = [j for j, i in enumerate(out_idx) if samples[i].input_caption]
            if dir_idx:
                in_txt = clip.embed_texts([samples[out_idx[j]].input_caption for j in dir_idx])
                rows_idx = [out_idx[j] for j in dir_idx]
                values["clip_dir"] = _scatter(n, rows_idx, cm.clip_dir(src_img[rows_idx], edit_img[rows_idx], in_txt, out_txt[dir_idx]))
            masked_idx = [j for j, i in enumerate(out_idx) if masks[i] is not None]
            if masked_idx:
                # PIE-Bench: CLIP-Whole and CLIP-Edit on the CLIPScore scale of the paper's tables.
                values["clip_whole"] = _scatter(n, [out_idx[j] for j in masked_idx], cm.clip_score(values["clip_out"][[out_idx[j] for j in masked_idx]]))
                masked = clip.embed_images([cm.masked_image(edits[out_idx[j]], masks[out_idx[j]]) for j in masked_idx])
                values["clip_edit"] = _scatter(n, [out_idx[j] for j in masked_idx], cm.clip_score(cm.cosine(masked, out_txt[masked_idx])))
        _merge_columns(rows, values)
    if dino is not None:
        src_dino = src["dino"] if "dino" in src else dino.embed_images(sources)
        edit_dino = src_dino if edits is sources else dino.embed_images(edits)
        _merge_columns(rows, {"dino": cm.cosine(src_dino, edit_dino)})
    return rows


def _scatter(n: int, index: Sequence[int], values: torch.Tensor) -> torch.Tensor:
    out = torch.full((n,), float("nan"))
    out[list(index)] = values.float()
    return out


def _merge_columns(rows: list[dict[str, float]], columns: dict[str, torch.Tensor]) -> None:
    for name, column in columns.items():
        for row, value in zip(rows, column.tolist()):
            if not math.isnan(value):
                row[name] = float(value)


def aggregate(rows: Sequence[dict[str, float]]) -> dict[str, float]:
    """Mean of each metric over the samples that have it (NaN-free); ``n`` is the sample count."""
    out: dict[str, float] = {"n": float(len(rows))}
    names = sorted({k for row in rows for k in row})
    for name in names:
        values = [row[name] for row in rows if name in row and not math.isnan(row[name])]
        if values:
            out[name] = float(np.mean(values))
    return out


# -------------------------------------------------------------------------------------------------
def evaluate_benchmark(
    editor: Any,
    samples: Sequence[BenchmarkSample],
    out_dir: str | Path,
    *,
    benchmark: str = "benchmark",
    clip: Any = None,
    dino: Any = None,
    batch_size: int = 8,
    seed: int = 0,
    sampling: dict[str, Any] | None = None,
    save_edits: bool = True,
    grid_samples: int = 8,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Edit every sample, score it and the copy-the-source baseline, overall and per kind.

    Writes ``out_dir/edits/<key>.png`` (with ``save_edits``), ``out_dir/per_sample.jsonl`` and
    ``out_dir/grid.png`` (sources over edits); returns the metrics dict that
    :func:`varedit_lab.eval.report.write_report` stores.
    """
    from varedit_lab.editing import pad_to_square

    out = Path(out_dir)
    (out / "edits").mkdir(parents=True, exist_ok=True)
    per_sample: list[dict[str, Any]] = []
    grid: list[tuple[Image.Image, Image.Image]] = []
    edit_seconds = 0.0
    for chunk, start in enumerate(range(0, len(samples), batch_size)):
        group = list(samples[start : start + batch_size])
        sources = [s.load_image() for s in group]
        began = time.perf_counter()
        edits = editor.edit(sources, [s.instruction for s in group], seed=seed + chunk, batch_size=batch_size, **(sampling or {}))
        edit_seconds += time.perf_counter() - began
        embeddings = {}
        if clip is not None:
            embeddings["clip"] = clip.embed_images(sources)
        if dino is not None:
            embeddings["dino"] = dino.embed_images(sources)
        edit_rows = score_pairs(sources, edits, group, clip, dino, embeddings)
        copy_rows = score_pairs(sources, sources, group, clip, dino, embeddings)
        for sample, edited, e_row, c_row in zip(group, edits, edit_rows, copy_rows):
            if save_edits:
                edited.save(out / "edits" / f"{sample.key}.png")
            per_sample.append({"key": sample.key, "kind": sample.kind, "instruction": sample.instruction, "edit": e_row, "copy": c_row})
        grid.extend((pad_to_square(s), pad_to_square(e)) for s, e in zip(sources, edits) if len(grid) < grid_samples)
        if progress is not None:
            progress(min(start + batch_size, len(samples)), len(samples))
    with open(out / "per_sample.jsonl", "w") as handle:
        for row in per_sample:
            handle.write(json.dumps(row) + "\n")
    if grid:
        save_pil_grid([[s for s, _ in grid], [e for _, e in grid]], out / "grid.png")
    return summarize(per_sample, benchmark, editor, edit_seconds)


def summarize(per_sample: Sequence[dict[str, Any]], benchmark: str, editor: Any, edit_seconds: float) -> dict[str, Any]:
    kinds = sorted({row["kind"] for row in per_sample})
    n = len(per_sample)
    return {
        "benchmark": benchmark,
        "num_samples": n,
        "editor": editor.describe(),
        "metrics": {v: aggregate([row[v] for row in per_sample]) for v in ("edit", "copy")},
        "per_kind": {
            kind: {v: aggregate([row[v] for row in per_sample if row["kind"] == kind]) for v in ("edit", "copy")}
            for kind in kinds
        },
        "timing": {"edit_seconds": round(edit_seconds, 4), "seconds_per_image": round(edit_seconds / max(n, 1), 4),
                   "device": str(editor.device), "precision": editor.precision},
    }


def save_pil_grid(rows: Sequence[Sequence[Image.Image]], path: str | Path, cell: int = 128, pad: int = 2) -> Path:
    """Rows of PIL images (each resized to ``cell`` x ``cell``) on a white canvas."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cols = max(len(r) for r in rows)
    canvas = Image.new("RGB", (cols * (cell + pad), len(rows) * (cell + pad)), (255, 255, 255))
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            canvas.paste(image.convert("RGB").resize((cell, cell), Image.LANCZOS), (c * (cell + pad), r * (cell + pad)))
    canvas.save(path)
    return path
