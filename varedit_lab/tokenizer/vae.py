"""The released BSQ-VAE (Infinity's ``flux_vqgan.AutoEncoder`` + ``MultiScaleBSQ``), re-implemented.

Architecture (reference-model.md section 3): a convolutional encoder/decoder without attention,
GroupNorm + swish, ``num_res_blocks`` residual blocks per encoder level and one more per decoder
level, downsampling by right/bottom zero padding and a stride-2 3x3 conv, upsampling by nearest x2
and a 3x3 conv. Encoder level i downsamples iff ``i < log2(patch_size)``; decoder level i upsamples
iff ``1 <= i <= log2(patch_size)``. The quantizer has no parameters (identity projections), only the
``mask`` buffer of bit weights.

Module names reproduce the released state-dict keys (``….conv.weight`` / ``….norm.weight``
wrappers), so a released checkpoint loads with a plain strict ``load_state_dict`` after the key
normalisation in :mod:`varedit_lab.tokenizer.checkpoint`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from varedit_lab.model.layout import ScaleSchedule, latent_to_tokens
from varedit_lab.model.quant import CodeAccumulator, MultiScaleTokens, multiscale_quantize


@dataclass(frozen=True)
class VAEArch:
    """The fields that define the VAE's function and its state-dict layout."""

    codebook_dim: int = 16
    patch_size: int = 8
    base_ch: int = 32
    encoder_ch_mult: tuple[int, ...] = (1, 2, 2, 4)
    decoder_ch_mult: tuple[int, ...] = (1, 2, 2, 4)
    num_res_blocks: int = 1
    norm_num_groups: int = 8
    norm_eps: float = 1e-6
    apply_spatial_patchify: bool = False

    def __post_init__(self) -> None:
        downs = math.log2(self.patch_size)
        if self.patch_size < 1 or downs != int(downs):
            raise ValueError(f"patch_size must be a power of two, got {self.patch_size}")
        for name in ("encoder_ch_mult", "decoder_ch_mult"):
            mult = getattr(self, name)
            if len(mult) < int(downs) + (1 if name == "decoder_ch_mult" else 0):
                raise ValueError(f"{name}={list(mult)} has too few levels for patch_size {self.patch_size}")

    @classmethod
    def from_any(cls, cfg: Any) -> "VAEArch":
        """From a TokenizerConfig, a DictConfig, a plain dict (e.g. a fixture's ``config['vae']``) or a VAEArch."""
        if isinstance(cfg, VAEArch):
            return cfg
        values: dict[str, Any] = {}
        for f in fields(cls):
            # Mappings (dicts, OmegaConf DictConfigs) by key, dataclasses by attribute.
            value = cfg.get(f.name) if isinstance(cfg, Mapping) else getattr(cfg, f.name, None)
            if value is None:
                continue
            if f.name.endswith("ch_mult"):
                value = tuple(int(v) for v in value)
            elif f.name == "apply_spatial_patchify":
                value = bool(value)
            values[f.name] = value
        return cls(**values)


def _group_norm(channels: int, arch: VAEArch) -> "Norm":
    return Norm(channels, arch.norm_num_groups, arch.norm_eps)


class Norm(nn.Module):
    """GroupNorm behind a ``.norm`` attribute (the release's ``Normalize`` wrapper naming)."""

    def __init__(self, channels: int, groups: int, eps: float):
        super().__init__()
        if channels % groups:
            raise ValueError(f"GroupNorm: {channels} channels are not divisible into {groups} groups")
        self.norm = nn.GroupNorm(groups, channels, eps=eps, affine=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x)


class Conv(nn.Module):
    """Conv2d behind a ``.conv`` attribute (the release's ``Conv`` wrapper naming)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, padding: int = 0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int, arch: VAEArch):
        super().__init__()
        self.norm1 = _group_norm(cin, arch)
        self.conv1 = Conv(cin, cout, 3, padding=1)
        self.norm2 = _group_norm(cout, arch)
        self.conv2 = Conv(cout, cout, 3, padding=1)
        # The 1x1 shortcut exists only where the width changes (as in the released checkpoints).
        self.nin_shortcut = Conv(cin, cout, 1) if cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        skip = self.nin_shortcut(x) if self.nin_shortcut is not None else x
        return skip + h


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Asymmetric (right/bottom) zero padding, then a stride-2 valid conv: the release's choice.
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """One resolution level: ``block`` (ModuleList) and an optional ``downsample``/``upsample``."""

    def __init__(self, blocks: list[nn.Module]):
        super().__init__()
        self.block = nn.ModuleList(blocks)


class _Mid(nn.Module):
    def __init__(self, channels: int, arch: VAEArch):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, arch)
        self.block_2 = ResnetBlock(channels, channels, arch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.block_1(x))


class Encoder(nn.Module):
    def __init__(self, arch: VAEArch):
        super().__init__()
        ch, mult = arch.base_ch, arch.encoder_ch_mult
        num_down = int(math.log2(arch.patch_size))
        self.conv_in = Conv(3, ch, 3, padding=1)
        self.down = nn.ModuleList()
        cin = ch
        for i, m in enumerate(mult):
            blocks = []
            for _ in range(arch.num_res_blocks):
                blocks.append(ResnetBlock(cin, ch * m, arch))
                cin = ch * m
            level = _Level(blocks)
            if i < num_down:
                level.downsample = Downsample(cin)
            self.down.append(level)
        self.mid = _Mid(cin, arch)
        self.norm_out = _group_norm(cin, arch)
        self.conv_out = Conv(cin, arch.codebook_dim, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            for block in level.block:
                h = block(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, arch: VAEArch):
        super().__init__()
        ch, mult = arch.base_ch, arch.decoder_ch_mult
        num_up = int(math.log2(arch.patch_size))
        cin = ch * mult[-1]
        self.conv_in = Conv(arch.codebook_dim, cin, 3, padding=1)
        self.mid = _Mid(cin, arch)
        levels: list[_Level] = []
        for i in reversed(range(len(mult))):
            blocks = []
            for _ in range(arch.num_res_blocks + 1):
                blocks.append(ResnetBlock(cin, ch * mult[i], arch))
                cin = ch * mult[i]
            level = _Level(blocks)
            if 1 <= i <= num_up:
                level.upsample = Upsample(cin)
            levels.insert(0, level)  # index = level number, as the release stores it
        self.up = nn.ModuleList(levels)
        self.norm_out = _group_norm(cin, arch)
        self.conv_out = Conv(cin, 3, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            for block in level.block:
                h = block(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class _LFQ(nn.Module):
    """Holds the release's only quantizer buffer: the bit weights 2^(d-1) ... 1 (index <-> bits)."""

    def __init__(self, codebook_dim: int):
        super().__init__()
        self.register_buffer("mask", 2 ** torch.arange(codebook_dim - 1, -1, -1))


class _Quantizer(nn.Module):
    def __init__(self, codebook_dim: int):
        super().__init__()
        self.lfq = _LFQ(codebook_dim)


class BSQTokenizer(nn.Module):
    """Encoder + decoder + multi-scale BSQ. Images are RGB in [-1, 1], (B, 3, H, W)."""

    def __init__(self, arch: VAEArch):
        super().__init__()
        self.arch = arch
        self.codebook_dim = arch.codebook_dim
        self.patch_size = arch.patch_size
        self.apply_spatial_patchify = arch.apply_spatial_patchify
        self.encoder = Encoder(arch)
        self.decoder = Decoder(arch)
        # The release registers the same quantizer under two names (``quantizer`` and ``quantize``),
        # so its state dict carries ``quantizer.lfq.mask`` and ``quantize.lfq.mask``.
        self.quantizer = _Quantizer(arch.codebook_dim)
        self.quantize = self.quantizer

    @classmethod
    def from_config(cls, cfg: Any) -> "BSQTokenizer":
        return cls(VAEArch.from_any(cfg))

    def zero_init_residual(self) -> "BSQTokenizer":
        """Zero the last conv of every residual branch, so each block starts as its shortcut.

        For training from scratch only (a released checkpoint overwrites it): the deep GroupNorm
        stacks then start close to identity maps and learn noticeably faster.
        """
        for module in self.modules():
            if isinstance(module, ResnetBlock):
                nn.init.zeros_(module.conv2.conv.weight)
                nn.init.zeros_(module.conv2.conv.bias)
        return self

    @property
    def token_channels(self) -> int:
        """d': channels of a transformer token (4d with 2x2 patchify)."""
        return self.codebook_dim * (4 if self.apply_spatial_patchify else 1)

    def encode_latent(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> continuous latent (B, d, H/p, W/p), fp32 (not quantised)."""
        return self.encoder(images).float()

    def encode_source(self, images: torch.Tensor, schedule: ScaleSchedule) -> torch.Tensor:
        """The source prefix (B, S, d'): continuous latent, area-resized to the finest VAE grid, patchified."""
        finest = schedule.vae_grids(self.apply_spatial_patchify)[-1]
        return latent_to_tokens(self.encode_latent(images), finest, self.apply_spatial_patchify)

    def encode_target(
        self,
        images: torch.Tensor,
        schedule: ScaleSchedule,
        flip_probs: Sequence[float] = (),
        generator: torch.Generator | None = None,
    ) -> MultiScaleTokens:
        """Per-scale bit labels, teacher-forcing inputs and summed codes of the target images."""
        return self.quantize_latent(self.encode_latent(images), schedule, flip_probs, generator)

    def quantize_latent(
        self,
        latent: torch.Tensor,
        schedule: ScaleSchedule,
        flip_probs: Sequence[float] = (),
        generator: torch.Generator | None = None,
    ) -> MultiScaleTokens:
        self._check_latent_grid(latent, schedule)
        return multiscale_quantize(latent, schedule, self.apply_spatial_patchify, flip_probs, generator)

    def decode_codes(self, summed_codes: torch.Tensor) -> torch.Tensor:
        """Summed codes (B, d, H', W') -> images (B, 3, H, W) clamped to [-1, 1]."""
        return self.decoder(summed_codes).clamp(-1.0, 1.0)

    def codes_from_bits(self, bits: Sequence[torch.Tensor], schedule: ScaleSchedule) -> torch.Tensor:
        """Token bits per scale (B, n_s, d') -> the decoder input: sum of upsampled codes (B, d, H', W')."""
        if len(bits) != schedule.num_scales:
            raise ValueError(f"got bits for {len(bits)} scales, the schedule has {schedule.num_scales}")
        acc = CodeAccumulator(schedule, self.apply_spatial_patchify, self.codebook_dim, bits[0].shape[0], bits[0].device)
        for s, b in enumerate(bits):
            acc.add(s, b)
        return acc.summed

    def decode(self, bits: Sequence[torch.Tensor], schedule: ScaleSchedule) -> torch.Tensor:
        """Token bits per scale -> images in [-1, 1]."""
        return self.decode_codes(self.codes_from_bits(bits, schedule))

    def _check_latent_grid(self, latent: torch.Tensor, schedule: ScaleSchedule) -> None:
        finest = schedule.vae_grids(self.apply_spatial_patchify)[-1]
        if tuple(latent.shape[-2:]) != tuple(finest):
            raise ValueError(
                f"latent grid {tuple(latent.shape[-2:])} does not match the schedule's finest VAE grid {finest} "
                f"(image size = grid x patch_size {self.patch_size})"
            )


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Images (B, 3, H, W) in [-1, 1] -> uint8 (B, H, W, 3) as the release converts them (truncating cast)."""
    x = (images.clamp(-1.0, 1.0) + 1.0) / 2.0 * 255.0
    return x.to(torch.uint8).permute(0, 2, 3, 1).contiguous()
