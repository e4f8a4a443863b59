"""Synthetic edit benchmark suites and their shards: deterministic sampling of scenes and edits.

Scenes, rendering and the exact edit masks are in :mod:`varedit_lab.data.scenes`; this module picks
what to draw. Two suites (:data:`SUITES`):

* ``flat`` (64 px by default): flat-colour shapes on a flat background, the original benchmark;
* ``textured`` (128 px by default: the 16x16 tokens of the paper's 256 px geometry with the stride-8
  tokenizer): the background and each shape carry a texture (stripes, checks or a gradient with a
  period of 2-4 tokens, random angle, phase and contrast) with probability 0.7. Recolour and
  background edits keep the texture, move and resize carry it along; added objects are flat (an
  instruction cannot say which texture to draw). Its samples also carry texture masks.

Degenerate edits are rejected and resampled deterministically (the same ``random.Random`` stream
keeps drawing): an ambiguous reference, an object hidden by occlusion or too small, an object out
of bounds, an empty mask, or an edit that changes less than half of its mask.

Instructions are lowercase words separated by single spaces; :func:`instruction_vocabulary` is
the set of every word a suite's instruction can contain (also written as ``vocab.txt``).
"""

from __future__ import annotations

import json
import math
import random
import time
from collections import Counter
from dataclasses import dataclass, replace
from io import BytesIO
from pathlib import Path
from typing import Any, Optional, Sequence

from PIL import Image

from varedit_lab.data.scenes import (
    BACKGROUNDS,
    COLORS,
    CONTRAST_RANGE,
    DIRECTIONS,
    EDIT_KINDS,
    MARGIN,
    PATTERNS,
    PERIOD_RANGE,
    RADIUS_RANGE,
    REGIONS,
    SHAPES,
    TEMPLATES,
    TEXTURE_ANGLES,
    EditSample,
    RejectedEdit,
    Scene,
    Shape,
    Texture,
    build_edit,
    edit_mask,
    footprint,
    instruction_words,
    render,
)

SPLITS: tuple[str, ...] = ("train", "val", "test")
MAX_ATTEMPTS = 200
VOCAB_FILE = "vocab.txt"


@dataclass(frozen=True)
class Suite:
    """What a benchmark suite draws."""

    name: str
    backgrounds: tuple[str, ...]  # background colour names it uses
    texture_probability: float  # of the background and of each scene object (0: flat scenes)
    default_image_size: int

    @property
    def textured(self) -> bool:
        return self.texture_probability > 0


SUITES: dict[str, Suite] = {
    "flat": Suite("flat", tuple(sorted(BACKGROUNDS)), 0.0, 64),
    # No black background: textures darken their colour, which would not show on black.
    "textured": Suite("textured", ("beige", "gray", "light blue", "white"), 0.7, 128),
}


def get_suite(name: str) -> Suite:
    if name not in SUITES:
        raise ValueError(f"unknown suite {name!r}; known: {sorted(SUITES)}")
    return SUITES[name]


def instruction_vocabulary(suite: str = "flat") -> list[str]:
    """Every word an instruction of ``suite`` can contain, sorted (instructions split on whitespace)."""
    return instruction_words(sorted(COLORS), get_suite(suite).backgrounds)


# ---------------------------------------------------------------------------------------------
# Sampling


class SyntheticEditGenerator:
    """Deterministic: ``sample(split, index)`` depends only on (suite, seed, split, index), not on call order.

    ``kinds`` restricts the edit kinds (sample ``index`` gets ``kinds[index % len(kinds)]``).
    ``rejections`` counts the degenerate edits that were resampled, by reason.
    """

    def __init__(
        self, image_size: Optional[int] = None, seed: int = 0, kinds: Sequence[str] = EDIT_KINDS, max_objects: int = 4, suite: str = "flat"
    ) -> None:
        self.suite = get_suite(suite)
        unknown = set(kinds) - set(EDIT_KINDS)
        if unknown:
            raise ValueError(f"unknown edit kinds {sorted(unknown)}; known: {EDIT_KINDS}")
        if not kinds:
            raise ValueError(f"no edit kinds given; known: {EDIT_KINDS}")
        image_size = self.suite.default_image_size if image_size is None else image_size
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
            if self.suite.name != "flat":  # flat metadata stays as it always was
                sample.meta["suite"] = self.suite.name
            return sample
        raise RuntimeError(f"no valid {kind!r} edit after {MAX_ATTEMPTS} attempts (split={split}, index={index})")

    # -- scenes ---------------------------------------------------------------------------------

    def _maybe_texture(self, rng: random.Random) -> Optional[Texture]:
        # The flat suite draws nothing here, so its random stream (and its samples) are unchanged.
        if not self.suite.textured or rng.random() >= self.suite.texture_probability:
            return None
        pattern = PATTERNS[rng.randrange(len(PATTERNS))]
        angle = TEXTURE_ANGLES[rng.randrange(len(TEXTURE_ANGLES))]
        return Texture(pattern, rng.uniform(*PERIOD_RANGE), angle, rng.random(), rng.uniform(*CONTRAST_RANGE))

    def _random_shape(self, rng: random.Random, taken: set[str], center: Optional[tuple[float, float]] = None, textured: bool = True) -> Shape:
        free = [(s, c) for s in SHAPES for c in COLORS if f"{c} {s}" not in taken]
        shape, color = free[rng.randrange(len(free))]
        r = rng.uniform(*RADIUS_RANGE)
        if center is None:
            lo, hi = MARGIN + 1.2 * r, 1 - MARGIN - 1.2 * r
            center = (rng.uniform(lo, hi), rng.uniform(lo, hi))
        texture = self._maybe_texture(rng) if textured else None
        return Shape(shape, color, center[0], center[1], r, texture)

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
        backgrounds = self.suite.backgrounds
        background = backgrounds[rng.randrange(len(backgrounds))]
        return Scene(background, tuple(objects), self._maybe_texture(rng))

    # -- edits ----------------------------------------------------------------------------------

    def _attempt(self, rng: random.Random, kind: str) -> EditSample:
        scene = self._random_scene(rng, min_objects=1)
        template = TEMPLATES[kind][rng.randrange(len(TEMPLATES[kind]))]
        size = self.image_size
        with_textures = self.suite.textured
        if kind == "background":  # the background texture (if any) is kept
            color = rng.choice([b for b in self.suite.backgrounds if b != scene.background])
            return build_edit(scene, replace(scene, background=color), kind, None, template.format(color=color), size, with_textures)
        if kind == "add":
            where = rng.choice(sorted(REGIONS))
            cx, cy = REGIONS[where]
            center = (cx + rng.uniform(-0.04, 0.04), cy + rng.uniform(-0.04, 0.04))
            new = self._random_shape(rng, set(), center, textured=False)  # may duplicate a name: the validator rejects it
            target = replace(scene, objects=scene.objects + (new,))
            instruction = template.format(article="an" if new.name[0] in "aeiou" else "a", obj=new.name, where=where)
            return build_edit(scene, target, kind, len(scene.objects), instruction, size, with_textures)
        ref = rng.randrange(len(scene.objects))
        obj = scene.objects[ref]
        objects = list(scene.objects)
        # Shapes carry their texture: a recolour keeps it, move and resize take it along.
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
        return build_edit(scene, target, kind, ref, instruction, size, with_textures)


# ---------------------------------------------------------------------------------------------
# Shards


def encode_png(image: Image.Image) -> bytes:
    buf = BytesIO()
    image.save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def sample_to_wds(sample: EditSample, key: str) -> dict[str, Any]:
    """The shard record: lossless PNGs (masks must stay exact), instruction text, JSON metadata,
    and the texture masks where the suite draws textures."""
    record = {
        "__key__": key,
        "src.png": encode_png(sample.source),
        "tgt.png": encode_png(sample.target),
        "mask.png": encode_png(sample.mask),
        "txt": sample.instruction,
        "json": json.dumps(sample.meta, sort_keys=True),
    }
    if sample.source_texture is not None and sample.target_texture is not None:
        record["src_texture.png"] = encode_png(sample.source_texture)
        record["tgt_texture.png"] = encode_png(sample.target_texture)
    return record


def shard_pattern(out_dir: str | Path, split: str, num_shards: int) -> str:
    """Brace pattern of a split's shards, e.g. ``out/train-{000000..000007}.tar``."""
    last = max(num_shards - 1, 0)
    return str(Path(out_dir) / f"{split}-{{{0:06d}..{last:06d}}}.tar")


def write_synthetic_shards(
    out_dir: str | Path,
    counts: dict[str, int] | None = None,
    image_size: Optional[int] = None,
    seed: int = 0,
    samples_per_shard: int = 256,
    kinds: Sequence[str] = EDIT_KINDS,
    overwrite: bool = False,
    suite: str = "flat",
) -> dict[str, list[str]]:
    """Generate ``counts[split]`` samples per split into ``{out_dir}/{split}-NNNNNN.tar``.

    ``image_size`` defaults to the suite's (flat 64, textured 128). Also writes
    ``{out_dir}/synth.json`` (parameters, brace patterns, kind histogram, rejections, timing) and
    ``{out_dir}/vocab.txt`` (:func:`instruction_vocabulary`, one word a line). Refuses to mix with
    shards of an earlier run unless ``overwrite``.
    """
    import webdataset as wds  # heavy-ish; only needed for writing

    from varedit_lab.data.shards import clear_splits

    counts = dict(counts or {"train": 1024, "val": 64, "test": 256})
    unknown = set(counts) - set(SPLITS)
    if unknown:
        raise ValueError(f"unknown splits {sorted(unknown)}; known: {SPLITS}")
    negative = {split: n for split, n in counts.items() if n < 0}
    if negative:
        raise ValueError(f"sample counts must be >= 0, got {negative}")
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard (--per-shard) must be >= 1, got {samples_per_shard}")
    generator = SyntheticEditGenerator(image_size=image_size, seed=seed, kinds=kinds, suite=suite)  # validates first
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
        "suite": generator.suite.name,
        "texture_masks": generator.suite.textured,
        "image_size": generator.image_size,
        "seed": seed,
        "samples_per_shard": samples_per_shard,
        "counts": counts,
        "shards": {split: shard_pattern(out, split, len(names)) for split, names in shards.items() if names},
        "kinds": {split: dict(sorted(c.items())) for split, c in kinds_seen.items()},
        "rejections": dict(sorted(generator.rejections.items())),
        "vocab": VOCAB_FILE,
        "seconds": round(elapsed, 3),
        "samples_per_second": round(sum(counts.values()) / max(elapsed, 1e-9), 1),
    }
    (out / VOCAB_FILE).write_text("\n".join(instruction_vocabulary(generator.suite.name)) + "\n")
    (out / "synth.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return shards


__all__ = [
    "BACKGROUNDS",
    "COLORS",
    "EDIT_KINDS",
    "EditSample",
    "RejectedEdit",
    "SHAPES",
    "SPLITS",
    "SUITES",
    "Scene",
    "Shape",
    "Suite",
    "SyntheticEditGenerator",
    "Texture",
    "build_edit",
    "edit_mask",
    "footprint",
    "get_suite",
    "instruction_vocabulary",
    "render",
    "sample_to_wds",
    "shard_pattern",
    "write_synthetic_shards",
]
