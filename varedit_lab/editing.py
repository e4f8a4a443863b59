"""Edit images with a trained, released or fixture VAREdit model.

:class:`Editor` holds the frozen tokenizer, the text encoder (optional), the transformer, the
conditioning strategy, the scale schedule and the sampling defaults. It is built from

* a Lightning checkpoint of this repository (:meth:`Editor.from_checkpoint`),
* released VAREdit weights: a folder or the hub id (:meth:`Editor.from_released`; layout and hub
  knowledge in :mod:`varedit_lab.released`),
* a reference fixture (:meth:`Editor.from_fixture`): its weights, with its stored text embeddings
  standing in for the text encoder that fixtures do not carry.

Inference follows the release (reference-model.md section 12): the input is padded to a square on a
white canvas anchored at the top-left, LANCZOS-resized to the model resolution and mapped to
[-1, 1]; the transformer decodes scale by scale with a KV cache and classifier-free guidance on the
logits (any batch size); the output is cropped back to the input's aspect ratio and resized to the
input's size. On CUDA (precision ``bf16``) the transformer blocks are stored in bf16 and run under
bf16 autocast, the other transformer weights and the VAE stay fp32, as in the reference; on CPU
everything is fp32 unless ``precision="bf16"`` is asked for.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence, Union

import numpy as np
import torch
from PIL import Image

from varedit_lab.model.transformer import TextFeatures
from varedit_lab.released import ReleasedFiles, released_config, resolve_released

ImageInput = Union[Image.Image, str, Path, torch.Tensor]

PRECISIONS = ("fp32", "bf16")


# -------------------------------------------------------------------------------------------------
# sampling settings
@dataclass(frozen=True)
class SamplingSettings:
    """Decoding settings (release defaults: cfg 4, tau 0.5, top-p 0.97; top-k is a no-op on bits)."""

    cfg: float = 4.0
    tau: float = 0.5
    top_k: int = 0
    top_p: float = 0.97
    greedy: bool = False

    def replace(self, **changes: Any) -> "SamplingSettings":
        """A copy with every non-``None`` change applied."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    @classmethod
    def from_config(cls, sampling: Any) -> "SamplingSettings":
        return cls(float(sampling.cfg), float(sampling.tau), int(sampling.top_k), float(sampling.top_p), bool(sampling.greedy))


# -------------------------------------------------------------------------------------------------
# pre- and post-processing (release inference: pad to square on white, top-left; LANCZOS)
def pad_to_square(image: Image.Image) -> Image.Image:
    """The image on a white square canvas of its longer side, anchored at the top-left."""
    image = image.convert("RGB")
    side = max(image.size)
    if image.size == (side, side):
        return image
    canvas = Image.new("RGB", (side, side), (255, 255, 255))
    canvas.paste(image, (0, 0))
    return canvas


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> (3, H, W) float in [-1, 1]."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32)
    return torch.from_numpy(array.copy()).permute(2, 0, 1) / 127.5 - 1.0


def tensor_to_pil(image: torch.Tensor) -> Image.Image:
    """(3, H, W) in [-1, 1] -> RGB PIL image (clamp, truncating cast as the release converts)."""
    from varedit_lab.images import to_uint8

    return Image.fromarray(to_uint8(image.unsqueeze(0))[0].numpy())


def preprocess(image: Image.Image, size: int) -> torch.Tensor:
    """Release inference preprocessing: pad to square (white, top-left), LANCZOS to ``size``, [-1, 1]."""
    square = pad_to_square(image)
    if square.size != (size, size):
        square = square.resize((size, size), Image.LANCZOS)
    return pil_to_tensor(square)


def postprocess(edited: torch.Tensor, original_size: tuple[int, int]) -> Image.Image:
    """Undo :func:`preprocess`: crop the square output to the input's aspect ratio, resize to its size."""
    image = tensor_to_pil(edited)
    width, height = original_size
    side = image.size[0]
    longer = max(width, height)
    box = (0, 0, max(1, round(width * side / longer)), max(1, round(height * side / longer)))
    if box[2:] != image.size:
        image = image.crop(box)
    if image.size != (width, height):
        image = image.resize((width, height), Image.LANCZOS)
    return image


def as_pil_list(images: ImageInput | Sequence[ImageInput]) -> list[Image.Image]:
    """PIL images, paths, a (B, 3, H, W) / (3, H, W) tensor in [-1, 1], or a list of these -> PIL list."""
    if isinstance(images, torch.Tensor):
        batch = images.unsqueeze(0) if images.ndim == 3 else images
        return [tensor_to_pil(x) for x in batch]
    if isinstance(images, (Image.Image, str, Path)):
        images = [images]
    out: list[Image.Image] = []
    for item in images:
        if isinstance(item, Image.Image):
            out.append(item.convert("RGB"))
        elif isinstance(item, torch.Tensor):
            out.extend(as_pil_list(item))
        else:
            with Image.open(item) as handle:
                out.append(handle.convert("RGB"))
    return out


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None``/``"auto"``: the GPU when present, else the CPU."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


# -------------------------------------------------------------------------------------------------
class Editor:
    """A ready-to-run editing model on one device (see the module docstring)."""

    def __init__(
        self,
        tokenizer: torch.nn.Module,
        model: torch.nn.Module,
        strategy: Any,
        schedule: Any,
        rope_layout: str,
        text_encoder: torch.nn.Module | None = None,
        sampling: SamplingSettings | None = None,
        device: str | torch.device | None = None,
        precision: str | None = None,
        fixed_text: TextFeatures | None = None,
        description: dict[str, Any] | None = None,
    ):
        self.device = resolve_device(device)
        self.precision = precision or ("bf16" if self.device.type == "cuda" else "fp32")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision={self.precision!r}; valid: {list(PRECISIONS)}")
        self.tokenizer = tokenizer.to(self.device).eval().requires_grad_(False)
        if self.precision == "bf16":
            cast_block_linears(model, torch.bfloat16)
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.text_encoder = text_encoder.to(self.device).eval() if text_encoder is not None else None
        self.strategy = strategy
        self.schedule = schedule
        self.rope_layout = rope_layout
        self.sampling = sampling or SamplingSettings()
        # Editors without a text encoder (fixtures) edit with these stored features.
        self.fixed_text = fixed_text
        self.stored_text: TextFeatures | None = None  # all of a fixture's stored embeddings
        self.description = dict(description or {})
        self._warned_fixed_text = False

    # -- construction -----------------------------------------------------------------------------
    @classmethod
    def from_module(cls, module: Any, device: str | torch.device | None = None, precision: str | None = None,
                    description: dict[str, Any] | None = None) -> "Editor":
        """From an :class:`~varedit_lab.module.EditorModule` (its frozen parts, model and config)."""
        cfg = module.cfg
        info = {"strategy": module.strategy.describe(), "preset": cfg.model.preset, "scales": list(cfg.model.scales),
                "rope_layout": cfg.model.rope_layout, **(description or {})}
        return cls(module.tokenizer, module.model, module.strategy, module.schedule, module.rope_layout,
                   text_encoder=module.text_encoder, sampling=SamplingSettings.from_config(cfg.sampling),
                   device=device, precision=precision, description=info)

    @classmethod
    def from_checkpoint(cls, path: str | Path, overrides: Sequence[str] = (), device: str | torch.device | None = None,
                        precision: str | None = None) -> "Editor":
        """From a Lightning checkpoint written by ``varedit-lab train`` (its config travels inside;
        ``overrides`` are config dotlist items, e.g. ``tokenizer.checkpoint=/new/path.pt``)."""
        from varedit_lab.module import EditorModule

        module = EditorModule.from_checkpoint(path, list(overrides))
        return cls.from_module(module, device, precision, {"source": "checkpoint", "path": str(path)})

    @classmethod
    def from_released(
        cls,
        directory: str | Path | None = None,
        *,
        model: str | None = None,
        transformer: str | Path | None = None,
        vae: str | Path | None = None,
        text_encoder: str | Path | None = None,
        size: str | None = None,
        resolution: int | None = None,
        overrides: Sequence[str] = (),
        device: str | torch.device | None = None,
        precision: str | None = None,
    ) -> "Editor":
        """From released VAREdit weights (folder layout in :func:`resolve_released`).

        ``overrides`` (config dotlist) adjust the built config, e.g. a non-standard model shape.
        """
        from varedit_lab.module import EditorModule

        files = resolve_released(directory, model=model, transformer=transformer, vae=vae, text_encoder=text_encoder,
                                 size=size, resolution=resolution)
        target = resolve_device(device)
        module = EditorModule(released_config(files, overrides, target))
        info = {"source": "released", "path": str(files.transformer), "size": files.size, "resolution": files.resolution}
        return cls.from_module(module, target, precision, info)

    @classmethod
    def from_fixture(cls, path: str | Path, text_index: int = 0, device: str | torch.device | None = None,
                     precision: str | None = None) -> "Editor":
        """From a reference fixture's config and weights; fixtures carry no T5, so the editor uses the
        fixture's stored text embedding ``text_index`` for every edit (or ``text=`` given to :meth:`edit`)."""
        from varedit_lab.model.layout import ScaleSchedule
        from varedit_lab.parity import fixture_model, fixture_strategy, load_fixture
        from varedit_lab.tokenizer.parity import fixture_tokenizer

        fixture = load_fixture(path)
        cfg = fixture["config"]
        stored = stored_fixture_text(fixture)
        if not 0 <= text_index < len(stored):
            raise IndexError(f"{path}: text_index {text_index}; the fixture stores {len(stored)} text embeddings")
        sampling = SamplingSettings(cfg=float(cfg["cfg"]), tau=float(cfg["tau"]), top_k=int(cfg.get("top_k", 0)),
                                    top_p=float(cfg.get("top_p", 0.0)))
        strategy = fixture_strategy(fixture)
        editor = cls(fixture_tokenizer(fixture), fixture_model(fixture), strategy, ScaleSchedule.from_scales(cfg["scale_schedule"]),
                     "reference_compat", text_encoder=None, sampling=sampling, device=device, precision=precision,
                     fixed_text=TextFeatures(stored.features[text_index : text_index + 1], stored.lengths[text_index : text_index + 1]),
                     description={"source": "fixture", "path": str(path), "name": cfg.get("name"), "strategy": strategy.describe(),
                                  "text_index": text_index})
        editor.stored_text = stored
        return editor

    # -- properties ---------------------------------------------------------------------------------
    @property
    def patchify(self) -> bool:
        return bool(self.tokenizer.apply_spatial_patchify)

    @property
    def image_size(self) -> int:
        """The square model resolution: finest VAE grid x VAE stride."""
        h, w = self.schedule.vae_grids(self.patchify)[-1]
        if h != w:
            raise ValueError(f"non-square finest grid {(h, w)}; the editor supports square schedules")
        return h * self.tokenizer.patch_size

    def describe(self) -> dict[str, Any]:
        return {**self.description, "image_size": self.image_size, "device": str(self.device), "precision": self.precision,
                "sampling": dataclasses.asdict(self.sampling)}

    # -- text ---------------------------------------------------------------------------------------
    def encode_text(self, instructions: Sequence[str]) -> TextFeatures:
        """Instruction strings -> text features (the fixed fixture text when there is no encoder)."""
        if self.text_encoder is not None:
            return self.text_encoder.encode(list(instructions))
        if self.fixed_text is None:
            raise ValueError("this editor has no text encoder; pass text=TextFeatures(...) to edit()")
        if not self._warned_fixed_text:
            warnings.warn("this editor has no text encoder (built from a fixture): instructions are ignored and the "
                          "fixture's stored text embedding is used", stacklevel=3)
            self._warned_fixed_text = True
        return broadcast_text(self.fixed_text, len(instructions))

    # -- generation ---------------------------------------------------------------------------------
    def _autocast(self):
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16")

    @torch.no_grad()
    def edit_tensors(self, source: torch.Tensor, text: TextFeatures, settings: SamplingSettings | None = None,
                     seed: int = 0) -> torch.Tensor:
        """Model-resolution sources (B, 3, S, S) in [-1, 1] -> edits (B, 3, S, S) in [-1, 1] on the CPU.

        No pre/post-processing: for data that is already square at ``image_size`` (the synthetic
        benchmark). One ``torch.Generator`` seeded with ``seed`` drives the whole batch.
        """
        s = settings or self.sampling
        size = self.image_size
        if source.ndim != 4 or tuple(source.shape[-2:]) != (size, size):
            raise ValueError(f"sources must be (B, 3, {size}, {size}); got {tuple(source.shape)}")
        text = broadcast_text(text, source.shape[0])
        latent = self.tokenizer.encode_latent(source.to(self.device, torch.float32))
        plan = self.strategy.plan(latent, self.schedule, self.rope_layout, self.patchify)
        generator = torch.Generator(device=self.device).manual_seed(int(seed))
        with self._autocast():
            gen = self.model.generate(plan, trim_text(text).to(self.device), cfg=s.cfg, tau=s.tau, top_k=s.top_k,
                                      top_p=s.top_p, greedy=s.greedy, generator=generator)
        return self.tokenizer.decode(gen.bits, self.schedule).float().cpu()

    def edit(
        self,
        images: ImageInput | Sequence[ImageInput],
        instructions: str | Sequence[str] | None = None,
        *,
        text: TextFeatures | None = None,
        cfg: float | None = None,
        tau: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        greedy: bool | None = None,
        seed: int = 0,
        batch_size: int = 8,
    ) -> list[Image.Image]:
        """Edit images of any size; returns PIL images of the inputs' sizes.

        ``instructions``: one per image, or one string for all. ``text``: precomputed features instead
        (batch 1 broadcasts). Sampling arguments left ``None`` use the editor's defaults. Chunks of
        ``batch_size`` images run as one batch (CFG doubles it); chunk ``i`` is seeded ``seed + i``.
        """
        pils = as_pil_list(images)
        if not pils:
            return []
        features = self._text_for(len(pils), instructions, text)
        settings = self.sampling.replace(cfg=cfg, tau=tau, top_p=top_p, top_k=top_k, greedy=greedy)
        size = self.image_size
        outputs: list[Image.Image] = []
        for chunk, start in enumerate(range(0, len(pils), batch_size)):
            batch = pils[start : start + batch_size]
            source = torch.stack([preprocess(p, size) for p in batch])
            chunk_text = TextFeatures(features.features[start : start + len(batch)], features.lengths[start : start + len(batch)])
            edited = self.edit_tensors(source, chunk_text, settings, seed=seed + chunk)
            outputs.extend(postprocess(e, p.size) for e, p in zip(edited, batch))
        return outputs

    def _text_for(self, n: int, instructions: str | Sequence[str] | None, text: TextFeatures | None) -> TextFeatures:
        if text is not None:
            return broadcast_text(text, n)
        if instructions is None:
            if self.text_encoder is None and self.fixed_text is not None:
                return broadcast_text(self.fixed_text, n)
            raise ValueError("give instructions (or text=TextFeatures)")
        if isinstance(instructions, str):
            instructions = [instructions] * n
        if len(instructions) != n:
            raise ValueError(f"{n} images but {len(instructions)} instructions")
        return self.encode_text(instructions)


def cast_block_linears(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Store the projection weights of the transformer blocks in ``dtype``: they are ~all of the
    bytes (the reference casts its blocks to bf16 for inference). Norms, biases added outside a
    Linear and the non-block layers stay fp32, so every op outside autocast's cast lists (LayerNorm on
    CPU) still sees fp32. Done before the move to the device: half the bytes to transfer."""
    for module in model.blocks.modules():
        if isinstance(module, torch.nn.Linear):
            module.to(dtype)


def broadcast_text(text: TextFeatures, n: int) -> TextFeatures:
    """``text`` for ``n`` samples: as is when it has ``n`` rows, expanded when it has one."""
    if len(text) == n:
        return text
    if len(text) == 1:
        return TextFeatures(text.features.expand(n, -1, -1), text.lengths.expand(n))
    raise ValueError(f"text features for {len(text)} samples, {n} images")


def trim_text(text: TextFeatures) -> TextFeatures:
    """Drop padding columns beyond the longest prompt (a chunk of a longer batch keeps its padding)."""
    longest = int(text.lengths.max())
    return text if text.features.shape[1] == longest else TextFeatures(text.features[:, :longest], text.lengths)


def stored_fixture_text(fixture: dict[str, Any]) -> TextFeatures:
    inputs = fixture["inputs"]
    return TextFeatures(inputs["text_embeddings"].float(), inputs["text_lengths"].long())


# -------------------------------------------------------------------------------------------------
# convenience API
_EDITOR_CACHE: dict[tuple, Editor] = {}


def load_editor(
    ckpt: str | Path | None = None,
    released: str | Path | None = None,
    fixture: str | Path | None = None,
    *,
    model: str | None = None,
    overrides: Sequence[str] = (),
    device: str | torch.device | None = None,
    precision: str | None = None,
    text_index: int = 0,
) -> Editor:
    """Build an editor from exactly one source: a checkpoint, a released folder or a fixture."""
    given = [name for name, value in (("ckpt", ckpt), ("released", released), ("fixture", fixture)) if value is not None]
    if len(given) != 1:
        raise ValueError(f"give exactly one of ckpt=, released=, fixture= (got {given or 'none'})")
    if ckpt is not None:
        if not Path(ckpt).is_file():
            raise FileNotFoundError(f"checkpoint {ckpt}: no such file")
        return Editor.from_checkpoint(ckpt, overrides, device, precision)
    if released is not None:
        return Editor.from_released(released, model=model, overrides=overrides, device=device, precision=precision)
    if not Path(fixture).is_file():  # type: ignore[arg-type]
        raise FileNotFoundError(f"fixture {fixture}: no such file")
    return Editor.from_fixture(fixture, text_index, device, precision)  # type: ignore[arg-type]


def edit(
    images: ImageInput | Sequence[ImageInput],
    instructions: str | Sequence[str] | None = None,
    *,
    ckpt: str | Path | None = None,
    released: str | Path | None = None,
    fixture: str | Path | None = None,
    editor: Editor | None = None,
    model: str | None = None,
    overrides: Sequence[str] = (),
    device: str | torch.device | None = None,
    cache: bool = True,
    **sampling: Any,
) -> Image.Image | list[Image.Image]:
    """One-call editing: ``varedit_lab.edit("in.png", "make the sky purple", ckpt="last.ckpt")``.

    Returns one image for one input image, else a list. The editor is built once per source and
    cached (``cache=False`` rebuilds). ``sampling``: cfg, tau, top_p, top_k, greedy, seed, batch_size, text.
    """
    if editor is None:
        key = (str(ckpt), str(released), str(fixture), model, tuple(overrides), str(device))
        editor = _EDITOR_CACHE.get(key) if cache else None
        if editor is None:
            editor = load_editor(ckpt, released, fixture, model=model, overrides=overrides, device=device)
            if cache:
                _EDITOR_CACHE.clear()  # hold one model at a time (released ones are large)
                _EDITOR_CACHE[key] = editor
    single = isinstance(images, (Image.Image, str, Path)) or (isinstance(images, torch.Tensor) and images.ndim == 3)
    out = editor.edit(images, instructions, **sampling)
    return out[0] if single else out


def timed(fn, *args: Any, **kwargs: Any) -> tuple[Any, float]:
    """``fn(*args, **kwargs)`` and its wall time in seconds (CUDA work included: outputs come back on the CPU)."""
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start


__all__ = [
    "Editor",
    "ReleasedFiles",
    "SamplingSettings",
    "as_pil_list",
    "cast_block_linears",
    "edit",
    "load_editor",
    "pad_to_square",
    "postprocess",
    "preprocess",
    "released_config",
    "resolve_released",
]
