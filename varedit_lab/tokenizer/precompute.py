"""Precomputed shards: the frozen tokenizer's (and T5's) outputs stored next to the images.

Large runs spend much of each step in the frozen VAE and text encoder. ``precompute_shards`` reads
edit shards in order and writes copies that keep every original key (``src.*``, ``tgt.*``, ``txt``,
``mask.*``, ``json``) and add

==================  ===========================  ==================================================
key                 array                        content
==================  ===========================  ==================================================
``src_latent.npy``  float32 (d, H', W')           continuous source latent (``encode_latent``); the
                                                   source prefix is ``latent_to_tokens`` of it
``tgt_bits.npy``    uint8 (T, d'/8), packed      target bit labels of all scales, concatenated in
                                                   sequence order, ``np.packbits`` along the bits
``txt_emb.npy``     float16/32 (L, C), optional   text features of the instruction (valid rows only)
==================  ===========================  ==================================================

plus ``precompute.json`` in the output folder (tokenizer architecture and checkpoint, schedule,
text encoder, counts). Teacher-forcing inputs are not stored: :func:`decode_precomputed` rebuilds
them exactly from the bits (:func:`varedit_lab.model.quant.teacher_inputs_from_bits`).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch

from varedit_lab.model.layout import ScaleSchedule
from varedit_lab.model.quant import teacher_inputs_from_bits
from varedit_lab.tokenizer.vae import BSQTokenizer

KEYS = ("src_latent.npy", "tgt_bits.npy", "txt_emb.npy")
MANIFEST = "precompute.json"


def _raw_samples(urls: Sequence[str]) -> Iterator[dict[str, Any]]:
    import webdataset as wds

    yield from wds.DataPipeline(wds.SimpleShardList(list(urls)), wds.tarfile_to_samples())


def _batches(urls: Sequence[str], image_size: int, batch_size: int) -> Iterator[tuple[list[dict[str, Any]], list[dict[str, Any]]]]:
    """(raw samples, decoded examples) in shard order; a bad sample stops with its key (no silent gaps)."""
    from varedit_lab.data.samples import DecodeEditSample

    decode = DecodeEditSample(image_size)
    raw, decoded = [], []
    for sample in _raw_samples(urls):
        raw.append(sample)
        decoded.append(decode(sample))
        if len(raw) == batch_size:
            yield raw, decoded
            raw, decoded = [], []
    if raw:
        yield raw, decoded


def _to_unit(images: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack(images).float() / 127.5 - 1.0


@torch.no_grad()
def precompute_shards(
    shards: Any,
    out_dir: str | Path,
    tokenizer: BSQTokenizer,
    schedule: ScaleSchedule,
    image_size: int,
    text_encoder: Optional[Any] = None,
    text_dtype: str = "float16",
    split: str = "train",
    batch_size: int = 32,
    samples_per_shard: int = 256,
    overwrite: bool = False,
    provenance: Optional[dict[str, Any]] = None,
) -> list[str]:
    """Write ``{out_dir}/{split}-NNNNNN.tar`` with the original keys plus the precomputed arrays."""
    import webdataset as wds

    from varedit_lab.data.shards import clear_splits, expand_shards

    urls = expand_shards(shards)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    clear_splits(out, [split], overwrite)
    tokenizer = tokenizer.eval()
    written: list[str] = []
    count = 0
    with wds.ShardWriter(str(out / f"{split}-%06d.tar"), maxcount=samples_per_shard, maxsize=1 << 40, verbose=0) as sink:
        for raw, decoded in _batches(urls, image_size, batch_size):
            source = _to_unit([d["source"] for d in decoded])
            target = _to_unit([d["target"] for d in decoded])
            latent = tokenizer.encode_latent(source).cpu().numpy()
            bits = torch.cat(tokenizer.encode_target(target, schedule).bits, dim=1).cpu().numpy()
            packed = np.packbits(bits, axis=-1)
            texts = text_encoder.encode([d["instruction"] for d in decoded]) if text_encoder is not None else None
            for i, sample in enumerate(raw):
                record = {k: v for k, v in sample.items() if not k.startswith("__") or k == "__key__"}
                record["src_latent.npy"] = latent[i]
                record["tgt_bits.npy"] = packed[i]
                if texts is not None:
                    n = int(texts.lengths[i])
                    record["txt_emb.npy"] = texts.features[i, :n].cpu().numpy().astype(text_dtype)
                sink.write(record)
                if sink.fname not in written:
                    written.append(sink.fname)
                count += 1
    manifest = {
        "generator": "varedit_lab.tokenizer.precompute",
        "source_shards": urls,
        "split": split,
        "samples": count,
        "image_size": image_size,
        "schedule": [list(g) for g in schedule.grids],
        "tokenizer": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(tokenizer.arch).items()},
        "token_channels": tokenizer.token_channels,
        "text": text_encoder is not None,
        "text_dtype": text_dtype if text_encoder is not None else None,
        **(provenance or {}),
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return written


def stored_targets(packed: torch.Tensor, schedule: ScaleSchedule, patchify: bool, codebook_dim: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Packed ``tgt_bits.npy`` rows (B, T, ceil(d'/8)) -> per-scale bit labels (B, n_s, d') and the
    teacher-forcing inputs rebuilt from them."""
    channels = codebook_dim * (4 if patchify else 1)
    shifts = torch.arange(7, -1, -1, device=packed.device, dtype=torch.uint8)
    bits = ((packed.unsqueeze(-1) >> shifts) & 1).flatten(-2)[..., :channels]  # np.packbits is MSB first
    per_scale = list(torch.split(bits, list(schedule.sizes), dim=1))
    return per_scale, teacher_inputs_from_bits(per_scale, schedule, patchify, codebook_dim)


def decode_precomputed(sample: dict[str, Any], schedule: ScaleSchedule, tokenizer_arch: Any) -> dict[str, torch.Tensor]:
    """The arrays of one precomputed sample as the editor consumes them (batch dimension of 1).

    Returns ``source_tokens`` (1, S, d'), ``source_latent`` (1, d, H', W'), ``target_bits`` (list of
    (1, n_s, d')), ``teacher_inputs`` (1, T - n_0, d') and, when stored, ``text`` (L, C).
    """
    from varedit_lab.data.samples import load_array
    from varedit_lab.model.layout import latent_to_tokens

    key = str(sample.get("__key__", "?"))
    patchify = bool(tokenizer_arch.apply_spatial_patchify)
    latent = torch.from_numpy(load_array(sample["src_latent.npy"], key, "src_latent.npy").astype(np.float32))[None]
    packed = torch.from_numpy(load_array(sample["tgt_bits.npy"], key, "tgt_bits.npy"))[None]
    if packed.shape[1] != schedule.total:
        raise ValueError(f"{key}: {packed.shape[1]} stored tokens, the schedule has {schedule.total}")
    per_scale, teacher = stored_targets(packed, schedule, patchify, int(tokenizer_arch.codebook_dim))
    out = {
        "source_latent": latent,
        "source_tokens": latent_to_tokens(latent, schedule.vae_grids(patchify)[-1], patchify),
        "target_bits": per_scale,
        "teacher_inputs": teacher,
    }
    if "txt_emb.npy" in sample:
        out["text"] = torch.from_numpy(load_array(sample["txt_emb.npy"], key, "txt_emb.npy").astype(np.float32))
    return out
