"""Synthetic edit benchmark: procedural scenes, instructions, exact targets and ground-truth masks.

A scene is a plain background plus 1-4 coloured shapes (circle, square, triangle, star) with unique
(colour, shape) pairs, so that "the red circle" always names one object. An edit is one of
:data:`EDIT_KINDS`; its mask is the exact region the instruction is about (255 = edited):

* ``recolor`` / ``remove``: the object's visible pixels in the source;
* ``add``: the new object's pixels in the target;
* ``move`` / ``resize``: the union of the object's visible pixels in source and target;
* ``background``: the background pixels (identical in source and target).

Everything is drawn without anti-aliasing (PIL ``ImageDraw`` on binary footprints, composited with
numpy) at the requested size, so ``source != target`` implies ``mask`` pixel for pixel. Geometry is
sampled in normalised units, so one seed gives the same scene layout at 64 and 256 px.

Degenerate edits are rejected and resampled deterministically (the same ``random.Random`` stream
keeps drawing): an ambiguous reference, an object hidden by occlusion or too small, an object out
of bounds, an empty mask, or an edit that changes less than half of its mask.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from io import BytesIO
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")
# Shape colours and background colours are disjoint, so every object differs from the background
# at every pixel (needed for exact recolour/remove/background masks).
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 70),
    "blue": (40, 90, 230),
    "yellow": (240, 210, 40),
    "purple": (140, 60, 190),
    "orange": (250, 140, 20),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (255, 255, 255),
    "black": (20, 20, 20),
    "gray": (128, 128, 128),
    "beige": (225, 210, 170),
    "light blue": (170, 210, 240),
}
EDIT_KINDS: tuple[str, ...] = ("recolor", "remove", "add", "move", "resize", "background")
SPLITS: tuple[str, ...] = ("train", "val", "test")

# Named placements for "add": 3x3 grid in normalised coordinates.
REGIONS: dict[str, tuple[float, float]] = {
    "at the top left": (0.22, 0.22),
    "at the top": (0.5, 0.22),
    "at the top right": (0.78, 0.22),
    "on the left": (0.22, 0.5),
    "in the center": (0.5, 0.5),
    "on the right": (0.78, 0.5),
    "at the bottom left": (0.22, 0.78),
    "at the bottom": (0.5, 0.78),
    "at the bottom right": (0.78, 0.78),
}
DIRECTIONS: dict[str, tuple[int, int]] = {"to the left": (-1, 0), "to the right": (1, 0), "up": (0, -1), "down": (0, 1)}

TEMPLATES: dict[str, tuple[str, ...]] = {
    "recolor": ("make the {obj} {color}", "change the color of the {obj} to {color}", "turn the {obj} {color}"),
    "remove": ("remove the {obj}", "delete the {obj}", "take away the {obj}"),
    "add": ("add {article} {obj} {where}", "put {article} {obj} {where}"),
    "move": ("move the {obj} {direction}", "shift the {obj} {direction}"),
    "resize": ("make the {obj} {adjective}",),
    "background": ("change the background to {color}", "make the background {color}"),
}

# Geometry (normalised units) and acceptance thresholds. Radii keep shapes big enough for a tiny
# model at 64 px (13-24 px across) while leaving room for 4 objects.
RADIUS_RANGE = (0.10, 0.19)
MARGIN = 0.02  # every shape stays this far inside the image
MIN_VISIBLE_FRACTION = 0.6  # an object less visible than this counts as hidden
MIN_VISIBLE_AREA = 0.004  # of the image area (16 px at 64 px)
MIN_CHANGED_FRACTION = 0.5  # of the mask that must actually change
MAX_ATTEMPTS = 200


@dataclass(frozen=True)
class Shape:
    """One object in normalised coordinates: centre (cx, cy) and radius r in [0, 1] image units."""

    shape: str
    color: str
    cx: float
    cy: float
    r: float

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"

    def to_dict(self) -> dict[str, Any]:
        return {"shape": self.shape, "color": self.color, "cx": round(self.cx, 4), "cy": round(self.cy, 4), "r": round(self.r, 4)}


@dataclass(frozen=True)
class Scene:
    """Background name plus shapes in drawing order (later shapes occlude earlier ones)."""

    background: str
    objects: tuple[Shape, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"background": self.background, "objects": [o.to_dict() for o in self.objects]}


@dataclass
class EditSample:
    """One benchmark item. ``mask`` is mode 'L' with 255 on the edited region."""

    source: Image.Image
    target: Image.Image
    instruction: str
    mask: Image.Image
    meta: dict[str, Any] = field(default_factory=dict)


class RejectedEdit(ValueError):
    """An edit that would be degenerate; ``reason`` is one of the keys counted in ``rejections``."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


# ---------------------------------------------------------------------------------------------
# Rendering


def _polygon(shape: Shape, size: int) -> list[tuple[float, float]]:
    cx, cy, r = shape.cx * size, shape.cy * size, shape.r * size
    if shape.shape == "triangle":  # radius scaled so its area is close to the other shapes'
        rr = 1.2 * r
        return [(cx + rr * math.cos(a), cy + rr * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    if shape.shape == "star":
        points = []
        for k in range(10):
            rr = 1.15 * r if k % 2 == 0 else 0.5 * r
            a = -math.pi / 2 + k * math.pi / 5
            points.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
        return points
    raise ValueError(f"not a polygon shape: {shape.shape}")


def footprint(shape: Shape, size: int) -> np.ndarray:
    """Boolean (size, size) map of the pixels a shape covers (no anti-aliasing)."""
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    cx, cy, r = shape.cx * size, shape.cy * size, shape.r * size
    if shape.shape == "circle":
        draw.ellipse([round(cx - r), round(cy - r), round(cx + r), round(cy + r)], fill=255)
    elif shape.shape == "square":
        h = 0.88 * r  # same area as the circle
        draw.rectangle([round(cx - h), round(cy - h), round(cx + h), round(cy + h)], fill=255)
    else:
        draw.polygon(_polygon(shape, size), fill=255)
    return np.asarray(canvas) > 0


def extent(shape: Shape) -> float:
    """Half-extent of the shape's bounding box in normalised units (for the bounds check)."""
    return shape.r * {"circle": 1.0, "square": 0.88, "triangle": 1.2, "star": 1.15}[shape.shape]


@dataclass
class Rendered:
    image: np.ndarray  # (H, W, 3) uint8
    visible: list[np.ndarray]  # per object, the pixels it shows in the final image
    background: np.ndarray  # pixels covered by no object


def render(scene: Scene, size: int) -> Rendered:
    """Composite the footprints in drawing order; the image is built from the same masks."""
    image = np.empty((size, size, 3), np.uint8)
    image[:] = BACKGROUNDS[scene.background]
    prints = [footprint(o, size) for o in scene.objects]
    for obj, fp in zip(scene.objects, prints):
        image[fp] = COLORS[obj.color]
    visible, covered_later = [], np.zeros((size, size), bool)
    for fp in reversed(prints):
        visible.append(fp & ~covered_later)
        covered_later |= fp
    visible.reverse()
    return Rendered(image, visible, ~covered_later)


# ---------------------------------------------------------------------------------------------
# Validation of an edit


def _check_scene(scene: Scene, rendered: Rendered, size: int, which: str) -> None:
    names = Counter(o.name for o in scene.objects)
    duplicated = [n for n, c in names.items() if c > 1]
    if duplicated:
        raise RejectedEdit("ambiguous", f"two or more '{duplicated[0]}' in the {which}")
    min_pixels = MIN_VISIBLE_AREA * size * size
    for obj, vis in zip(scene.objects, rendered.visible):
        e = extent(obj)
        if not (MARGIN <= obj.cx - e and obj.cx + e <= 1 - MARGIN and MARGIN <= obj.cy - e and obj.cy + e <= 1 - MARGIN):
            raise RejectedEdit("out_of_bounds", f"{obj.name} in the {which}")
        full = footprint(obj, size).sum()
        shown = vis.sum()
        if shown < min_pixels:
            raise RejectedEdit("too_small", f"{obj.name} shows {shown} px in the {which}")
        if shown < MIN_VISIBLE_FRACTION * full:
            raise RejectedEdit("occluded", f"{obj.name} is {shown / full:.0%} visible in the {which}")


def edit_mask(kind: str, ref: Optional[int], src: Rendered, tgt: Rendered) -> np.ndarray:
    """The semantic edit region (see the module docstring). ``ref`` indexes the source objects,
    except for ``add`` where it indexes the new object in the target."""
    if kind == "background":
        return src.background.copy()
    assert ref is not None
    if kind in ("recolor", "remove"):
        return src.visible[ref].copy()
    if kind == "add":
        return tgt.visible[ref].copy()
    if kind in ("move", "resize"):
        return src.visible[ref] | tgt.visible[ref]
    raise ValueError(f"unknown edit kind {kind!r}; known: {EDIT_KINDS}")


def build_edit(source: Scene, target: Scene, kind: str, ref: Optional[int], instruction: str, size: int) -> EditSample:
    """Render and validate one edit; raise :class:`RejectedEdit` when it is degenerate."""
    if ref is not None and kind != "add":
        name = source.objects[ref].name
        if sum(o.name == name for o in source.objects) != 1:
            raise RejectedEdit("ambiguous", f"'{name}' does not name exactly one object")
    src, tgt = render(source, size), render(target, size)
    _check_scene(source, src, size, "source")
    _check_scene(target, tgt, size, "target")
    mask = edit_mask(kind, ref, src, tgt)
    changed = np.any(src.image != tgt.image, axis=-1)
    if not mask.any():
        raise RejectedEdit("empty_mask", instruction)
    if (changed & mask).sum() < MIN_CHANGED_FRACTION * mask.sum():
        raise RejectedEdit("small_change", instruction)
    # By construction every change lies inside the mask; a violation is a bug, not a bad sample.
    assert not (changed & ~mask).any(), f"pixels changed outside the mask for {kind!r}: {instruction}"
    return EditSample(
        source=Image.fromarray(src.image, "RGB"),
        target=Image.fromarray(tgt.image, "RGB"),
        instruction=instruction,
        mask=Image.fromarray(mask.astype(np.uint8) * 255, "L"),
        meta={"kind": kind, "source_scene": source.to_dict(), "target_scene": target.to_dict(), "ref": ref},
    )


# ---------------------------------------------------------------------------------------------
# Sampling


class SyntheticEditGenerator:
    """Deterministic: ``sample(split, index)`` depends only on (seed, split, index), not on call order.

    ``kinds`` restricts the edit kinds (sample ``index`` gets ``kinds[index % len(kinds)]``).
    ``rejections`` counts the degenerate edits that were resampled, by reason.
    """

    def __init__(self, image_size: int = 64, seed: int = 0, kinds: Sequence[str] = EDIT_KINDS, max_objects: int = 4) -> None:
        unknown = set(kinds) - set(EDIT_KINDS)
        if unknown:
            raise ValueError(f"unknown edit kinds {sorted(unknown)}; known: {EDIT_KINDS}")
        if image_size < 32:
            raise ValueError(f"image_size must be >= 32 to keep shapes recognisable, got {image_size}")
        self.image_size = image_size
        self.seed = seed
        self.kinds = tuple(kinds)
        self.max_objects = max_objects
        self.rejections: Counter[str] = Counter()

    def rng(self, split: str, index: int) -> random.Random:
        # String seeds are hashed with SHA-512 by ``random``: stable across runs and PYTHONHASHSEED.
        return random.Random(f"varedit-synth/{self.seed}/{split}/{index}")

    def sample(self, split: str, index: int) -> EditSample:
        rng = self.rng(split, index)
        # Round-robin kinds: every split (and every prefix of it, e.g. the first N validation
        # samples) is balanced across edit kinds, which per-kind metrics need.
        kind = self.kinds[index % len(self.kinds)]
        for attempt in range(MAX_ATTEMPTS):
            try:
                sample = self._attempt(rng, kind)
            except RejectedEdit as err:
                self.rejections[err.reason] += 1
                continue
            sample.meta.update(seed=self.seed, split=split, index=index, attempts=attempt + 1, image_size=self.image_size)
            return sample
        raise RuntimeError(f"no valid {kind!r} edit after {MAX_ATTEMPTS} attempts (split={split}, index={index})")

    # -- scenes ---------------------------------------------------------------------------------

    def _random_shape(self, rng: random.Random, taken: set[str], center: Optional[tuple[float, float]] = None) -> Shape:
        free = [(s, c) for s in SHAPES for c in COLORS if f"{c} {s}" not in taken]
        shape, color = free[rng.randrange(len(free))]
        r = rng.uniform(*RADIUS_RANGE)
        if center is None:
            lo, hi = MARGIN + 1.2 * r, 1 - MARGIN - 1.2 * r
            center = (rng.uniform(lo, hi), rng.uniform(lo, hi))
        return Shape(shape, color, center[0], center[1], r)

    def _random_scene(self, rng: random.Random, min_objects: int = 1) -> Scene:
        n = rng.randint(min_objects, self.max_objects)
        objects: list[Shape] = []
        for _ in range(n):
            # A few placement tries that avoid overlap keep scenes readable; overlap that remains
            # is allowed and judged by the occlusion check.
            for _try in range(10):
                cand = self._random_shape(rng, {o.name for o in objects})
                if all(math.hypot(cand.cx - o.cx, cand.cy - o.cy) > 1.1 * (cand.r + o.r) for o in objects):
                    break
            objects.append(cand)
        background = sorted(BACKGROUNDS)[rng.randrange(len(BACKGROUNDS))]
        return Scene(background, tuple(objects))

    # -- edits ----------------------------------------------------------------------------------

    def _attempt(self, rng: random.Random, kind: str) -> EditSample:
        scene = self._random_scene(rng, min_objects=1)
        template = TEMPLATES[kind][rng.randrange(len(TEMPLATES[kind]))]
        size = self.image_size
        if kind == "background":
            color = rng.choice([b for b in sorted(BACKGROUNDS) if b != scene.background])
            return build_edit(scene, replace(scene, background=color), kind, None, template.format(color=color), size)
        if kind == "add":
            where = rng.choice(sorted(REGIONS))
            cx, cy = REGIONS[where]
            center = (cx + rng.uniform(-0.04, 0.04), cy + rng.uniform(-0.04, 0.04))
            new = self._random_shape(rng, set(), center)  # may duplicate a name: the validator rejects it
            target = replace(scene, objects=scene.objects + (new,))
            instruction = template.format(article="an" if new.name[0] in "aeiou" else "a", obj=new.name, where=where)
            return build_edit(scene, target, kind, len(scene.objects), instruction, size)
        ref = rng.randrange(len(scene.objects))
        obj = scene.objects[ref]
        objects = list(scene.objects)
        if kind == "recolor":
            color = rng.choice([c for c in sorted(COLORS) if c != obj.color])
            objects[ref] = replace(obj, color=color)
            instruction = template.format(obj=obj.name, color=color)
        elif kind == "remove":
            del objects[ref]
            instruction = template.format(obj=obj.name)
        elif kind == "move":
            direction = rng.choice(sorted(DIRECTIONS))
            dx, dy = DIRECTIONS[direction]
            dist = rng.uniform(0.25, 0.45)
            objects[ref] = replace(obj, cx=obj.cx + dx * dist, cy=obj.cy + dy * dist)
            instruction = template.format(obj=obj.name, direction=direction)
        elif kind == "resize":
            bigger = rng.random() < 0.5
            factor = rng.uniform(1.5, 1.8) if bigger else rng.uniform(0.5, 0.65)
            objects[ref] = replace(obj, r=obj.r * factor)
            instruction = template.format(obj=obj.name, adjective="bigger" if bigger else "smaller")
        else:
            raise ValueError(f"unknown edit kind {kind!r}")
        target = replace(scene, objects=tuple(objects))
        return build_edit(scene, target, kind, ref, instruction, size)


# ---------------------------------------------------------------------------------------------
# Shards


def encode_png(image: Image.Image) -> bytes:
    buf = BytesIO()
    image.save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def sample_to_wds(sample: EditSample, key: str) -> dict[str, Any]:
    """The shard record: lossless PNGs (masks must stay exact), instruction text, JSON metadata."""
    return {
        "__key__": key,
        "src.png": encode_png(sample.source),
        "tgt.png": encode_png(sample.target),
        "mask.png": encode_png(sample.mask),
        "txt": sample.instruction,
        "json": json.dumps(sample.meta, sort_keys=True),
    }


def shard_pattern(out_dir: str | Path, split: str, num_shards: int) -> str:
    """Brace pattern of a split's shards, e.g. ``out/train-{000000..000007}.tar``."""
    last = max(num_shards - 1, 0)
    return str(Path(out_dir) / f"{split}-{{{0:06d}..{last:06d}}}.tar")


def write_synthetic_shards(
    out_dir: str | Path,
    counts: dict[str, int] | None = None,
    image_size: int = 64,
    seed: int = 0,
    samples_per_shard: int = 256,
    kinds: Sequence[str] = EDIT_KINDS,
    overwrite: bool = False,
) -> dict[str, list[str]]:
    """Generate ``counts[split]`` samples per split into ``{out_dir}/{split}-NNNNNN.tar``.

    Also writes ``{out_dir}/synth.json`` (parameters, brace patterns, kind histogram, rejections,
    timing). Refuses to mix with shards of an earlier run unless ``overwrite``.
    """
    import webdataset as wds  # heavy-ish; only needed for writing

    from varedit_lab.data.shards import clear_splits

    counts = dict(counts or {"train": 1024, "val": 64, "test": 256})
    unknown = set(counts) - set(SPLITS)
    if unknown:
        raise ValueError(f"unknown splits {sorted(unknown)}; known: {SPLITS}")
    generator = SyntheticEditGenerator(image_size=image_size, seed=seed, kinds=kinds)  # validates first
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    clear_splits(out, counts, overwrite)
    shards: dict[str, list[str]] = {}
    kinds_seen: dict[str, Counter[str]] = {}
    start = time.perf_counter()
    for split, n in counts.items():
        names: list[str] = []
        kinds_seen[split] = Counter()
        if n <= 0:
            shards[split] = names
            continue
        with wds.ShardWriter(str(out / f"{split}-%06d.tar"), maxcount=samples_per_shard, maxsize=1 << 40, verbose=0) as sink:
            for index in range(n):
                sample = generator.sample(split, index)
                kinds_seen[split][sample.meta["kind"]] += 1
                sink.write(sample_to_wds(sample, f"{split}-{index:08d}"))
                if sink.fname not in names:
                    names.append(sink.fname)
        shards[split] = names
    elapsed = time.perf_counter() - start
    manifest = {
        "generator": "varedit_lab.data.synth",
        "image_size": image_size,
        "seed": seed,
        "samples_per_shard": samples_per_shard,
        "counts": counts,
        "shards": {split: shard_pattern(out, split, len(names)) for split, names in shards.items() if names},
        "kinds": {split: dict(sorted(c.items())) for split, c in kinds_seen.items()},
        "rejections": dict(sorted(generator.rejections.items())),
        "seconds": round(elapsed, 3),
        "samples_per_second": round(sum(counts.values()) / max(elapsed, 1e-9), 1),
    }
    (out / "synth.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return shards


__all__ = [
    "BACKGROUNDS",
    "COLORS",
    "EDIT_KINDS",
    "EditSample",
    "RejectedEdit",
    "SHAPES",
    "Scene",
    "Shape",
    "SyntheticEditGenerator",
    "build_edit",
    "edit_mask",
    "footprint",
    "render",
    "sample_to_wds",
    "shard_pattern",
    "write_synthetic_shards",
]
