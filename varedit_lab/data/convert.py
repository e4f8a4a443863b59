"""Convert (source, target, instruction[, mask]) triples into edit shards.

Two input layouts (the shapes public edit datasets are usually exported in):

**Folder**::

    FOLDER/
      source/<name>.{jpg,jpeg,png,webp}
      target/<name>.{...}                 same <name> as the source
      mask/<name>.png                     optional, per sample (255 = edited region)
      instructions.json                   {"<name>": "<instruction>", ...}
        or instructions.tsv / .txt        one "<name>\\t<instruction>" per line
        or instructions.jsonl             one {"name": ..., "instruction": ...} per line

**JSONL** (one record per line; relative paths are relative to the JSONL file)::

    {"source": "a/1.jpg", "target": "b/1.jpg", "instruction": "make it snowy", "mask": "m/1.png", "id": "1"}

Accepted aliases: source = src | input | input_image | source_image; target = tgt | output |
output_image | edited_image | target_image; instruction = txt | text | prompt | edit |
edit_instruction; mask = mask_image. ``id`` (else the source stem) becomes the sample key;
``kind`` and any other JSON-serialisable fields go into the ``json`` metadata.

Output: ``{out}/{split}-NNNNNN.tar`` with ``src.<ext>``, ``tgt.<ext>``, ``txt``, ``mask.png``
(when given) and ``json``. Without ``image_size`` the image bytes are copied unchanged; with it,
both images are resized to cover and centre-cropped (the loader's preprocessing, target first
resized to the source size), masks with nearest-neighbour so they stay binary.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any, Iterator, Optional

from PIL import Image

from varedit_lab.data.samples import IMAGE_EXTS, BadSampleError, resize_cover_crop, warn_summary

ALIASES: dict[str, tuple[str, ...]] = {
    "source": ("source", "src", "input", "input_image", "source_image"),
    "target": ("target", "tgt", "output", "output_image", "edited_image", "target_image"),
    "instruction": ("instruction", "txt", "text", "prompt", "edit", "edit_instruction"),
    "mask": ("mask", "mask_image"),
}
_ALIAS_KEYS = {alias for names in ALIASES.values() for alias in names}


@dataclass
class EditRecord:
    key: str
    source: Path
    target: Path
    instruction: str
    mask: Optional[Path] = None
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class ConvertResult:
    shards: list[str]
    written: int
    skipped: Counter[str]
    first_error: dict[str, str]


def _safe_key(text: str) -> str:
    # webdataset splits a member name at the first dot, so keys must not contain dots (or slashes)
    return re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_") or "sample"


def _pick(record: dict[str, Any], what: str) -> Any:
    for alias in ALIASES[what]:
        if record.get(alias) not in (None, ""):
            return record[alias]
    return None


def _read_instructions(folder: Path) -> dict[str, str]:
    if (folder / "instructions.json").is_file():
        data = json.loads((folder / "instructions.json").read_text())
        return {str(k): str(v) for k, v in data.items()}
    if (folder / "instructions.jsonl").is_file():
        out = {}
        for line in (folder / "instructions.jsonl").read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                out[str(row["name"])] = str(_pick(row, "instruction") or "")
        return out
    for name in ("instructions.tsv", "instructions.txt"):
        if (folder / name).is_file():
            out = {}
            for line in (folder / name).read_text().splitlines():
                if line.strip():
                    stem, _, text = line.partition("\t")
                    out[stem.strip()] = text.strip()
            return out
    raise FileNotFoundError(f"{folder}: no instructions.json / instructions.jsonl / instructions.tsv / instructions.txt")


def _images_by_stem(folder: Path) -> dict[str, Path]:
    if not folder.is_dir():
        return {}
    return {p.stem: p for p in sorted(folder.iterdir()) if p.suffix.lower().lstrip(".") in IMAGE_EXTS}


def iter_folder(folder: Path) -> Iterator[EditRecord]:
    if not (folder / "source").is_dir():
        raise FileNotFoundError(f"{folder}: expected a source/ folder (and target/, instructions.*); see varedit_lab.data.convert")
    instructions = _read_instructions(folder)
    targets, masks = _images_by_stem(folder / "target"), _images_by_stem(folder / "mask")
    for stem, source in _images_by_stem(folder / "source").items():
        target = targets.get(stem, folder / "target" / f"{stem}.missing")
        yield EditRecord(stem, source, target, instructions.get(stem, ""), masks.get(stem), {"name": stem})


def iter_jsonl(path: Path) -> Iterator[EditRecord]:
    base = path.parent
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        source, target = _pick(row, "source"), _pick(row, "target")
        mask = _pick(row, "mask")
        key = str(row.get("id", Path(str(source)).stem if source else f"line{lineno}"))
        meta = {k: v for k, v in row.items() if k not in _ALIAS_KEYS and k != "id"}
        yield EditRecord(
            key=key,
            source=base / str(source) if source else base / f"<line {lineno}: no source>",
            target=base / str(target) if target else base / f"<line {lineno}: no target>",
            instruction=str(_pick(row, "instruction") or ""),
            mask=base / str(mask) if mask else None,
            meta=meta,
        )


def iter_records(input_path: str | Path) -> Iterator[EditRecord]:
    """Records of a folder or a ``.jsonl`` file (layouts in the module docstring)."""
    path = Path(input_path)
    if path.is_dir():
        return iter_folder(path)
    if path.is_file():
        return iter_jsonl(path)
    raise FileNotFoundError(f"no such folder or JSONL file: {path}")


def _load(path: Path, mode: str, key: str, what: str) -> tuple[bytes, Image.Image]:
    if not path.is_file():
        raise BadSampleError("missing_key", key, f"{what} file {path} not found")
    data = path.read_bytes()
    try:
        image = Image.open(BytesIO(data))
        image.load()
        return data, image.convert(mode)
    except Exception as err:  # PIL raises many types for corrupt data
        raise BadSampleError("unreadable_image", key, f"{what} {path}: {type(err).__name__}: {err}") from err


def _encode(image: Image.Image, fmt: str) -> bytes:
    buf = BytesIO()
    if fmt == "jpg":
        image.save(buf, format="JPEG", quality=95)
    else:
        image.save(buf, format=fmt.upper())
    return buf.getvalue()


def _ext(path: Path) -> str:
    ext = path.suffix.lower().lstrip(".")
    return "jpg" if ext == "jpeg" else ext


def record_to_wds(record: EditRecord, key: str, image_size: Optional[int], min_side: int = 8) -> dict[str, Any]:
    """Validate one record and build its shard sample; raise :class:`BadSampleError` if unusable."""
    if not record.instruction.strip():
        raise BadSampleError("missing_key", key, "empty or missing instruction")
    src_bytes, source = _load(record.source, "RGB", key, "source")
    tgt_bytes, target = _load(record.target, "RGB", key, "target")
    mask_bytes, mask = _load(record.mask, "L", key, "mask") if record.mask is not None else (None, None)
    for what, image in (("source", source), ("target", target), ("mask", mask)):
        if image is not None and min(image.size) < min_side:
            raise BadSampleError("wrong_size", key, f"{what} is {image.size[0]}x{image.size[1]} (< {min_side})")
    if mask is not None and mask.size != source.size:
        raise BadSampleError("wrong_size", key, f"mask {mask.size} does not match source {source.size}")
    meta = {"kind": str(record.meta.get("kind", "")), **record.meta, "source_file": str(record.source)}
    sample: dict[str, Any] = {"__key__": key, "txt": record.instruction.strip(), "json": json.dumps(meta, sort_keys=True, default=str)}
    if image_size is None:  # copy bytes: no re-encoding loss
        sample[f"src.{_ext(record.source)}"] = src_bytes
        sample[f"tgt.{_ext(record.target)}"] = tgt_bytes
        if mask is not None:
            sample["mask.png"] = mask_bytes if _ext(record.mask) == "png" else _encode(mask, "png")  # type: ignore[arg-type]
        return sample
    if target.size != source.size:
        target = target.resize(source.size, Image.LANCZOS)
    fmt = "png" if _ext(record.source) in ("png", "webp") else "jpg"
    sample[f"src.{fmt}"] = _encode(resize_cover_crop(source, image_size, Image.LANCZOS), fmt)
    sample[f"tgt.{fmt}"] = _encode(resize_cover_crop(target, image_size, Image.LANCZOS), fmt)
    if mask is not None:
        small = resize_cover_crop(mask, image_size, Image.NEAREST).point(lambda v: 255 if v >= 128 else 0)
        sample["mask.png"] = _encode(small, "png")
    return sample


def convert_to_shards(
    input_path: str | Path,
    out_dir: str | Path,
    split: str = "train",
    image_size: Optional[int] = None,
    samples_per_shard: int = 1000,
    strict: bool = False,
    min_side: int = 8,
    overwrite: bool = False,
) -> ConvertResult:
    """Write the records of ``input_path`` to ``{out_dir}/{split}-NNNNNN.tar``; skip (or raise on) bad ones."""
    import webdataset as wds

    from varedit_lab.data.shards import clear_splits

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    clear_splits(out, [split], overwrite)
    skipped: Counter[str] = Counter()
    first: dict[str, str] = {}
    names: list[str] = []
    seen: Counter[str] = Counter()
    written = 0
    with wds.ShardWriter(str(out / f"{split}-%06d.tar"), maxcount=samples_per_shard, maxsize=1 << 40, verbose=0) as sink:
        for record in iter_records(input_path):
            key = _safe_key(record.key)
            seen[key] += 1
            if seen[key] > 1:
                key = f"{key}_{seen[key] - 1}"
            try:
                sample = record_to_wds(record, key, image_size, min_side)
            except BadSampleError as err:
                if strict:
                    raise
                skipped[err.reason] += 1
                first.setdefault(err.reason, str(err))
                continue
            sink.write(sample)
            written += 1
            if sink.fname not in names:
                names.append(sink.fname)
    warn_summary(skipped, first, f"convert {input_path}")
    if not written:  # ShardWriter opens its first shard eagerly; drop the empty file
        for path in out.glob(f"{split}-*.tar"):
            path.unlink()
    return ConvertResult(names, written, skipped, first)


__all__ = ["ConvertResult", "EditRecord", "convert_to_shards", "iter_records", "record_to_wds"]
