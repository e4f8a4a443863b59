"""Scenes of the synthetic edit benchmark: words, geometry, textures, rendering, and one exact edit.

A scene is a background (optionally textured) plus coloured shapes (circle, square, triangle, star,
each optionally textured) with unique (colour, shape) pairs, so that "the red circle" always names
one object. An edit is one of :data:`EDIT_KINDS`; its mask is the exact region the instruction is
about (255 = edited):

* ``recolor`` / ``remove``: the object's visible pixels in the source;
* ``add``: the new object's pixels in the target;
* ``move`` / ``resize``: the union of the object's visible pixels in source and target;
* ``background``: the background pixels (identical in source and target).

Everything is drawn without anti-aliasing (PIL ``ImageDraw`` on binary footprints, composited with
numpy) at the requested size, so ``source != target`` implies ``mask`` pixel for pixel. Geometry is
sampled in normalised units, so one seed gives the same scene layout at 64 and 256 px.

A texture (:class:`Texture`) darkens its region's colour by ``contrast * w`` with a periodic field
``w`` in [0, 1] (stripes, checks or a triangle-wave gradient). Textures belong to their region:
an object's texture is anchored at its centre and travels with it (move, resize keep the period),
and a recolour keeps the texture. Because ``contrast <= 0.6``, two different colours under the same
texture differ at every pixel, so recolour and background masks stay equal to the changed pixels.

The suites that sample these scenes live in :mod:`varedit_lab.data.synth`.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")
# Shape colours and background colours are disjoint, so every flat object differs from the
# background at every pixel (needed for exact recolour/remove/background masks).
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
ADJECTIVES: tuple[str, ...] = ("bigger", "smaller")
ARTICLES: tuple[str, ...] = ("a", "an")

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

# Textures. Periods are 2-4 tokens of the 16x16 token grid of 128 px images with the stride-8
# tokenizer (16-32 px at 128 px), stated in normalised units so they scale with the image.
PATTERNS: tuple[str, ...] = ("stripes", "checks", "gradient")
TEXTURE_ANGLES: tuple[int, ...] = (0, 45, 90, 135)  # degrees; the field varies along this direction
PERIOD_RANGE = (2 / 16, 4 / 16)
CONTRAST_RANGE = (0.3, 0.6)  # <= 0.6: a pixel keeps >= 40 % of its colour, so recolours change every pixel


def instruction_words(colors: Sequence[str], backgrounds: Sequence[str]) -> list[str]:
    """Every word an instruction over these colour names can contain (sorted, unique)."""
    fillers = [*colors, *backgrounds, *SHAPES, *REGIONS, *DIRECTIONS, *ADJECTIVES, *ARTICLES]
    literal = [word for templates in TEMPLATES.values() for t in templates for word in t.split() if not word.startswith("{")]
    return sorted({word for phrase in [*fillers, *literal] for word in phrase.split()})


@dataclass(frozen=True)
class Texture:
    """A periodic darkening field; ``period`` in normalised units, ``phase`` in periods."""

    pattern: str
    period: float
    angle: int
    phase: float
    contrast: float

    def field(self, size: int, anchor: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
        """(size, size) float field in [0, 1] at pixel centres; ``anchor`` is its origin (normalised)."""
        coords = (np.arange(size) + 0.5) / size
        x, y = coords[None, :] - anchor[0], coords[:, None] - anchor[1]
        theta = math.radians(self.angle)
        u = (x * math.cos(theta) + y * math.sin(theta)) / self.period + self.phase
        if self.pattern == "stripes":
            return (np.mod(u, 1.0) < 0.5).astype(np.float64)
        if self.pattern == "checks":  # cells of half a period: a row repeats once per period, like stripes
            v = (-x * math.sin(theta) + y * math.cos(theta)) / self.period + self.phase
            return np.mod(np.floor(2 * u) + np.floor(2 * v), 2.0)
        if self.pattern == "gradient":  # triangle wave: linear ramps up and down
            return 1.0 - np.abs(2.0 * np.mod(u, 1.0) - 1.0)
        raise ValueError(f"unknown texture pattern {self.pattern!r}; known: {PATTERNS}")

    def to_dict(self) -> dict[str, Any]:
        return {"pattern": self.pattern, "period": round(self.period, 5), "angle": self.angle, "phase": round(self.phase, 4), "contrast": round(self.contrast, 4)}


def paint(color: tuple[int, int, int], texture: Optional[Texture], size: int, anchor: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
    """(size, size, 3) uint8 canvas of one colour, darkened by the texture when there is one."""
    base = np.asarray(color, np.float64)
    if texture is None:
        return np.broadcast_to(base.astype(np.uint8), (size, size, 3))
    shade = 1.0 - texture.contrast * texture.field(size, anchor)
    return np.rint(shade[..., None] * base).astype(np.uint8)


@dataclass(frozen=True)
class Shape:
    """One object in normalised coordinates: centre (cx, cy) and radius r in [0, 1] image units."""

    shape: str
    color: str
    cx: float
    cy: float
    r: float
    texture: Optional[Texture] = None

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"shape": self.shape, "color": self.color, "cx": round(self.cx, 4), "cy": round(self.cy, 4), "r": round(self.r, 4)}
        if self.texture is not None:
            out["texture"] = self.texture.to_dict()
        return out


@dataclass(frozen=True)
class Scene:
    """Background name plus shapes in drawing order (later shapes occlude earlier ones)."""

    background: str
    objects: tuple[Shape, ...] = ()
    background_texture: Optional[Texture] = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"background": self.background, "objects": [o.to_dict() for o in self.objects]}
        if self.background_texture is not None:
            out["background_texture"] = self.background_texture.to_dict()
        return out


@dataclass
class EditSample:
    """One benchmark item. ``mask`` is mode 'L' with 255 on the edited region; the texture masks
    (mode 'L', 255 where a texture was drawn) exist for suites that draw textures."""

    source: Image.Image
    target: Image.Image
    instruction: str
    mask: Image.Image
    meta: dict[str, Any] = field(default_factory=dict)
    source_texture: Optional[Image.Image] = None
    target_texture: Optional[Image.Image] = None


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
    textured: np.ndarray  # pixels drawn with a texture


def render(scene: Scene, size: int) -> Rendered:
    """Composite the footprints in drawing order; the image is built from the same masks."""
    image = np.array(paint(BACKGROUNDS[scene.background], scene.background_texture, size))
    prints = [footprint(o, size) for o in scene.objects]
    for obj, fp in zip(scene.objects, prints):
        image[fp] = paint(COLORS[obj.color], obj.texture, size, (obj.cx, obj.cy))[fp]
    visible, covered_later = [], np.zeros((size, size), bool)
    for fp in reversed(prints):
        visible.append(fp & ~covered_later)
        covered_later |= fp
    visible.reverse()
    background = ~covered_later
    textured = background.copy() if scene.background_texture is not None else np.zeros((size, size), bool)
    for obj, vis in zip(scene.objects, visible):
        if obj.texture is not None:
            textured |= vis
    return Rendered(image, visible, background, textured)


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


def _l_image(mask: np.ndarray) -> Image.Image:
    return Image.fromarray(mask.astype(np.uint8) * 255, "L")


def build_edit(
    source: Scene, target: Scene, kind: str, ref: Optional[int], instruction: str, size: int, texture_masks: bool = False
) -> EditSample:
    """Render and validate one edit; raise :class:`RejectedEdit` when it is degenerate.

    ``texture_masks`` adds the source's and target's texture masks to the sample."""
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
        mask=_l_image(mask),
        meta={"kind": kind, "source_scene": source.to_dict(), "target_scene": target.to_dict(), "ref": ref},
        source_texture=_l_image(src.textured) if texture_masks else None,
        target_texture=_l_image(tgt.textured) if texture_masks else None,
    )


__all__ = [
    "BACKGROUNDS",
    "COLORS",
    "EDIT_KINDS",
    "EditSample",
    "PATTERNS",
    "RejectedEdit",
    "Rendered",
    "SHAPES",
    "Scene",
    "Shape",
    "TEMPLATES",
    "Texture",
    "build_edit",
    "edit_mask",
    "extent",
    "footprint",
    "instruction_words",
    "paint",
    "render",
]
