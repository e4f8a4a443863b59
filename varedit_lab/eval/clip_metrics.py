"""CLIP and DINO edit metrics from local model folders (transformers 5, no torchvision, no downloads).

Definitions (EMU-Edit / MagicBrush / InstructPix2Pix conventions; embeddings are L2-normalised):

* **CLIP-I**: cos(CLIP(source image), CLIP(edited image)), how much of the source survives;
* **CLIP-Out** (a.k.a. CLIP-T): cos(CLIP(edited image), CLIP(output caption));
* **CLIP-Dir**: cos(CLIP(edited) - CLIP(source), CLIP(output caption) - CLIP(input caption)), whether
  the image changed in the direction the captions did;
* **DINO**: cos of the DINO CLS tokens (``last_hidden_state[:, 0]``, after the final LayerNorm) of
  source and edit;
* **L1**: mean absolute pixel difference between source and edit, in [0, 1] units.

In transformers 5 ``CLIPModel.get_image_features`` / ``get_text_features`` return a ModelOutput whose
``pooler_output`` is already the *projected* embedding (the same vectors transformers 4 returned as a
tensor); :func:`projected` accepts either form. Images are preprocessed by the model folder's
PIL-backend image processor (``AutoImageProcessor.from_pretrained(path, backend="pil")``), so
torchvision is never needed. torchmetrics' ``CLIPScore`` is not used: with transformers 5 it breaks
on the ModelOutput (ecosystem.md section 6.1) and it rejects local paths.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

EMBED_BATCH = 32


def projected(output: Any) -> torch.Tensor:
    """The embedding tensor of ``get_*_features``: a tensor (transformers 4) or ``.pooler_output`` (5)."""
    if isinstance(output, torch.Tensor):
        return output
    pooled = getattr(output, "pooler_output", None)
    if pooled is None:
        raise TypeError(f"cannot find the projected embedding in {type(output).__name__}")
    return pooled


def embed_in_batches(images: Sequence[Image.Image], processor: Any, device: Any,
                     features: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """(N, D) unit vectors on the CPU: ``features(pixel_values)`` over batches of ``EMBED_BATCH`` RGB images."""
    out = []
    for start in range(0, len(images), EMBED_BATCH):
        chunk = [im.convert("RGB") for im in images[start : start + EMBED_BATCH]]
        pixels = processor(images=chunk, return_tensors="pt")["pixel_values"].to(device)
        out.append(F.normalize(features(pixels).float(), dim=-1).cpu())
    return torch.cat(out) if out else torch.empty(0)


def _check_folder(path: str | Path, what: str) -> Path:
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{what} {path}: not a local Hugging Face model folder (no config.json); metrics never download")
    return path


class ClipScorer:
    """Normalised CLIP image and text embeddings from a local ``CLIPModel`` folder."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, processor: Any, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.processor = processor
        self.max_length = int(model.config.text_config.max_position_embeddings)

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu") -> "ClipScorer":
        from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

        path = _check_folder(path, "CLIP")
        return cls(CLIPModel.from_pretrained(path), AutoTokenizer.from_pretrained(path),
                   AutoImageProcessor.from_pretrained(path, backend="pil"), device)

    @torch.no_grad()
    def embed_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """(N, D) unit vectors on the CPU."""
        return embed_in_batches(images, self.processor, self.device, lambda pixels: projected(self.model.get_image_features(pixel_values=pixels)))

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """(N, D) unit vectors on the CPU (texts truncated to CLIP's 77 tokens)."""
        out = []
        for start in range(0, len(texts), EMBED_BATCH):
            tokens = self.tokenizer(list(texts[start : start + EMBED_BATCH]), padding=True, truncation=True,
                                    max_length=self.max_length, return_tensors="pt")
            tokens = {k: v.to(self.device) for k, v in tokens.items() if k in ("input_ids", "attention_mask")}
            out.append(F.normalize(projected(self.model.get_text_features(**tokens)).float(), dim=-1).cpu())
        return torch.cat(out) if out else torch.empty(0)


class DinoScorer:
    """Normalised DINO CLS embeddings from a local ``AutoModel`` folder (DINOv2 or a DINO ViT)."""

    def __init__(self, model: torch.nn.Module, processor: Any, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.processor = processor

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu") -> "DinoScorer":
        import json

        from transformers import AutoImageProcessor, AutoModel

        path = _check_folder(path, "DINO")
        kwargs: dict[str, Any] = {}
        # DINO ViT checkpoints carry no trained pooler; skip building a random one (the CLS token is used).
        if json.loads((path / "config.json").read_text()).get("model_type") == "vit":
            kwargs["add_pooling_layer"] = False
        return cls(AutoModel.from_pretrained(path, **kwargs), AutoImageProcessor.from_pretrained(path, backend="pil"), device)

    @torch.no_grad()
    def embed_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return embed_in_batches(images, self.processor, self.device, lambda pixels: self.model(pixel_values=pixels).last_hidden_state[:, 0])


# -------------------------------------------------------------------------------------------------
# the metrics, on embeddings (unit vectors) and pixels
def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine similarity (N,) of two (N, D) batches."""
    return F.cosine_similarity(a.float(), b.float(), dim=-1)


def clip_i(source_image: torch.Tensor, edited_image: torch.Tensor) -> torch.Tensor:
    return cosine(source_image, edited_image)


def clip_out(edited_image: torch.Tensor, output_caption: torch.Tensor) -> torch.Tensor:
    return cosine(edited_image, output_caption)


def clip_dir(source_image: torch.Tensor, edited_image: torch.Tensor, input_caption: torch.Tensor,
             output_caption: torch.Tensor) -> torch.Tensor:
    """cos(image change, caption change); NaN where either change is zero (e.g. an unedited copy)."""
    image_delta = edited_image.float() - source_image.float()
    text_delta = output_caption.float() - input_caption.float()
    value = cosine(image_delta, text_delta)
    degenerate = (image_delta.norm(dim=-1) < 1e-8) | (text_delta.norm(dim=-1) < 1e-8)
    return value.masked_fill(degenerate, float("nan"))


def clip_score(cos: torch.Tensor) -> torch.Tensor:
    """torchmetrics' CLIPScore scale, used by PIE-Bench's CLIP-Whole / CLIP-Edit: 100 * max(cos, 0)."""
    return 100.0 * cos.clamp_min(0.0)


def pixel_array(image: Image.Image, size: tuple[int, int] | None = None) -> np.ndarray:
    """RGB float array in [0, 1], optionally resized (LANCZOS) to ``size`` = (width, height)."""
    image = image.convert("RGB")
    if size is not None and image.size != tuple(size):
        image = image.resize(tuple(size), Image.LANCZOS)
    return np.asarray(image, dtype=np.float32) / 255.0


def l1_distance(source: Image.Image, edited: Image.Image) -> float:
    """Mean |source - edited| over pixels and channels in [0, 1]; the edit is resized to the source."""
    return float(np.abs(pixel_array(source) - pixel_array(edited, source.size)).mean())


def masked_image(image: Image.Image, mask: np.ndarray) -> Image.Image:
    """The image with pixels outside ``mask`` (H, W bool, the image's size) set to black, as PIE-Bench's
    CLIP-Edit multiplies the edited image by the edit mask."""
    array = np.asarray(image.convert("RGB"), dtype=np.uint8) * mask[..., None].astype(np.uint8)
    return Image.fromarray(array)


def region_psnr_l1(source: Image.Image, edited: Image.Image, region: np.ndarray) -> tuple[float, float]:
    """PSNR (capped as varedit_lab.metrics) and L1 between source and edit over ``region`` (H, W bool);
    NaN when the region is empty."""
    from varedit_lab.metrics import masked_mse_l1, psnr_from_mse

    if not region.any():
        return float("nan"), float("nan")
    a = torch.from_numpy(pixel_array(source)).permute(2, 0, 1)[None] * 2 - 1
    b = torch.from_numpy(pixel_array(edited, source.size)).permute(2, 0, 1)[None] * 2 - 1
    mse, l1, _ = masked_mse_l1(b, a, torch.from_numpy(region)[None, None].float())
    return float(psnr_from_mse(mse)[0]), float(l1[0])
