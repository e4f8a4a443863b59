"""Everything this project knows about the released VAREdit checkpoints, in one place.

The weights live in one Hugging Face model repository, ``HiDream-ai/VAREdit``, flat at its root. The
upstream inference script (``infer.py`` / ``app.py`` of github.com/HiDream-ai/VAREdit, commit 2ca737c)
reads, relative to that root (``pretrain_root``)::

    2B-512.pth                            VAREdit-2B transformer, 512 px (the demo app's; not in the README)
    8B-512.pth, 8B-1024.pth               VAREdit-8B transformers, 512 / 1024 px
    infinity_vae_d32reg.pth               Infinity VAE of the 2B model (d = 32, stride 16)
    infinity_vae_d56_f8_14_patchify.pth   Infinity VAE of the 8B model (d = 14, stride 8, 2x2 patchify)
    flan-t5-xl/                           Hugging Face T5 folder (config, tokenizer, weights)

A local folder in the same layout works everywhere a hub id does. :func:`download` fetches one
model's transformer, its VAE and the text encoder, never the other models' files.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from huggingface_hub import snapshot_download

from varedit_lab.config import config_from_dict
from varedit_lab.model.layout import IMAGE_SIZE_TO_PN, PN_SCALES

HUB_REPO = "HiDream-ai/VAREdit"
T5_DIR = "flan-t5-xl"
# The encoder half of google/flan-t5-xl (its config.json), for memory planning without the files.
T5_XL_ENCODER = dict(d_model=2048, d_kv=64, d_ff=5120, num_layers=24, num_heads=32, vocab_size=32128,
                     feed_forward_proj="gated-gelu")
# Transformer files are named {size}-{resolution}.pth; 256 is accepted for local 2B stage-1 files.
TRANSFORMER_NAME = re.compile(r"^(?P<size>[28])B-(?P<res>256|512|1024)\.pth$", re.IGNORECASE)
VAE_FILES = {"2b": "infinity_vae_d32reg.pth", "8b": "infinity_vae_d56_f8_14_patchify.pth"}
# Infinity VAE architectures (reference-model.md section 3.1), as TokenizerConfig fields.
VAE_ARCH: dict[str, dict[str, Any]] = {
    "2b": dict(codebook_dim=32, patch_size=16, base_ch=128, encoder_ch_mult=[1, 2, 4, 4, 4], decoder_ch_mult=[1, 2, 4, 4, 4],
               num_res_blocks=2, norm_num_groups=32, apply_spatial_patchify=False),
    "8b": dict(codebook_dim=14, patch_size=8, base_ch=128, encoder_ch_mult=[1, 2, 4, 4], decoder_ch_mult=[1, 2, 4, 4],
               num_res_blocks=2, norm_num_groups=32, apply_spatial_patchify=True),
}
# The models on the hub (name -> size, resolution).
MODELS: dict[str, tuple[str, int]] = {"2B-512": ("2b", 512), "8B-512": ("8b", 512), "8B-1024": ("8b", 1024)}
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")

LAYOUT_HELP = """  DIR/2B-512.pth | 8B-512.pth | 8B-1024.pth   (VAREdit transformer, {size}-{resolution}.pth)
  DIR/infinity_vae_d32reg.pth                 (VAE for 2B)
  DIR/infinity_vae_d56_f8_14_patchify.pth     (VAE for 8B)
  DIR/flan-t5-xl/                             (Hugging Face T5 folder)"""


def model_files(model: str) -> list[str]:
    """The hub patterns of one released model: its transformer, its VAE and the text encoder folder."""
    if model not in MODELS:
        raise ValueError(f"--model {model!r}: valid choices {sorted(MODELS)}")
    size, _ = MODELS[model]
    return [f"{model}.pth", VAE_FILES[size], f"{T5_DIR}/*"]


def download(model: str, directory: str | Path | None = None, repo: str = HUB_REPO, revision: str | None = None) -> Path:
    """Fetch one released model (``2B-512`` | ``8B-512`` | ``8B-1024``) and return its folder.

    Without ``directory`` the files stay in the Hugging Face cache (``HF_HOME``) and the snapshot
    folder is returned; with ``HF_HUB_OFFLINE=1`` a pre-filled cache is used without network.
    """
    patterns = model_files(model)
    path = snapshot_download(repo_id=repo, allow_patterns=patterns, revision=revision,
                             local_dir=str(directory) if directory is not None else None)
    return Path(path)


def is_hub_id(value: str | os.PathLike) -> bool:
    """``owner/name`` that is not an existing local path."""
    text = str(value)
    return bool(_HUB_ID.match(text)) and not Path(text).exists()


@dataclass(frozen=True)
class ReleasedFiles:
    transformer: Path
    vae: Path
    text_encoder: Path
    size: str  # "2b" | "8b"
    resolution: int


def _parse_name(path: Path) -> tuple[str | None, int | None]:
    m = TRANSFORMER_NAME.match(path.name)
    return (f"{m.group('size')}b", int(m.group("res"))) if m else (None, None)


def locate(source: str | Path, model: str | None = None) -> Path:
    """A released folder: ``source`` itself, or the snapshot of hub repo ``source`` (downloaded if needed)."""
    if is_hub_id(source):
        if model is None:
            raise ValueError(f"--released {source} is a hub repository: choose the model with --model ({', '.join(MODELS)})")
        return download(model, repo=str(source))
    return Path(source)


def resolve_released(
    directory: str | Path | None = None,
    *,
    model: str | None = None,
    transformer: str | Path | None = None,
    vae: str | Path | None = None,
    text_encoder: str | Path | None = None,
    size: str | None = None,
    resolution: int | None = None,
) -> ReleasedFiles:
    """Find the files of a released VAREdit model; explicit paths win over the folder convention.

    ``directory`` is a folder in the layout of :data:`LAYOUT_HELP` or a hub id (``HiDream-ai/VAREdit``,
    then ``model`` is required and the files are downloaded or taken from the cache). ``model``
    ("8B-1024") picks the transformer when the folder holds several. Size and resolution come from the
    transformer's file name unless given. Raises :class:`FileNotFoundError` listing everything missing.
    """
    root = locate(directory, model) if directory is not None else None
    problems: list[str] = []
    if root is not None and not root.is_dir():
        raise FileNotFoundError(f"--released {root}: not a directory or hub id (expected {LAYOUT_HELP})")
    if transformer is None and root is not None:
        candidates = sorted(p for p in root.glob("*.pth") if TRANSFORMER_NAME.match(p.name))
        if model is not None:
            wanted = model if model.lower().endswith(".pth") else f"{model}.pth"
            candidates = [p for p in candidates if p.name.lower() == wanted.lower()]
        if len(candidates) == 1:
            transformer = candidates[0]
        elif not candidates:
            problems.append(f"no transformer {'named ' + repr(model) if model else '{2B,8B}-{256,512,1024}.pth'} in {root}")
        else:
            problems.append(f"several transformers in {root}: {[p.name for p in candidates]}; choose one with --model (e.g. {candidates[0].stem})")
    name_size, name_res = _parse_name(Path(transformer)) if transformer is not None else (None, None)
    size = (size or name_size or MODELS.get(model or "", ("",))[0] or "").lower() or None
    resolution = resolution or name_res
    if transformer is not None and not Path(transformer).is_file():
        problems.append(f"transformer {transformer}: no such file")
    if transformer is not None and (size not in VAE_FILES or resolution is None):
        problems.append(f"{Path(transformer).name}: cannot tell size/resolution from the name; pass size ('2b'/'8b') and resolution")
    if vae is None and root is not None and size in VAE_FILES:
        vae = root / VAE_FILES[size]
    if vae is None or not Path(vae).is_file():
        expected = VAE_FILES.get(size or "", " or ".join(VAE_FILES.values()))
        problems.append(f"VAE {vae if vae is not None else expected}: missing (the {size or '2B/8B'} model reads {expected})")
    if text_encoder is None and root is not None:
        text_encoder = root / T5_DIR
    if text_encoder is None or not (Path(text_encoder) / "config.json").is_file():
        problems.append(f"text encoder {text_encoder or T5_DIR + '/'}: missing or not a Hugging Face folder (no config.json)")
    if problems:
        raise FileNotFoundError("released model incomplete:\n  - " + "\n  - ".join(problems) + f"\nexpected layout:\n{LAYOUT_HELP}")
    return ReleasedFiles(Path(transformer), Path(vae), Path(text_encoder), size, int(resolution))  # type: ignore[arg-type]


def released_config(files: ReleasedFiles, overrides: Sequence[str] = (), device: torch.device | None = None) -> Any:
    """The run config of a released model: preset shape, release RoPE table, SAR on layer 0."""
    if files.resolution not in IMAGE_SIZE_TO_PN:
        raise ValueError(f"resolution {files.resolution}: supported {sorted(IMAGE_SIZE_TO_PN)}")
    on_gpu = device is not None and device.type == "cuda"
    data = {
        "model": {
            "preset": f"infinity_{files.size}",
            "scales": list(PN_SCALES[IMAGE_SIZE_TO_PN[files.resolution]]),
            "rope_layout": "reference_compat",  # the released weights were trained with this table
            "init_from": str(files.transformer),
            "drop_path_rate": 0.0,
        },
        "tokenizer": {"checkpoint": str(files.vae), **VAE_ARCH[files.size]},
        # flan-t5-xl overflows in fp16 (the reference's choice); bf16 keeps the range on GPU.
        "text": {"path": str(files.text_encoder), "dtype": "bfloat16" if on_gpu else "float32", "max_length": 512},
        "conditioning": {"name": "sar", "options": {"layers": [0]}},
        "sampling": {"cfg": 4.0, "tau": 0.5, "top_k": 0, "top_p": 0.97, "greedy": False},
        "logger": {"mode": "disabled"},
    }
    return config_from_dict(data, overrides, source=f"released {files.transformer}")


__all__ = ["HUB_REPO", "MODELS", "ReleasedFiles", "T5_DIR", "VAE_ARCH", "VAE_FILES", "download", "is_hub_id", "locate",
           "model_files", "released_config", "resolve_released"]
