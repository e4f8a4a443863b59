"""The editor LightningModule: one module for every conditioning strategy.

It wires the frozen tokenizer and text encoder (outside the trainable trunk and outside checkpoints),
the transformer, and a strategy from the registry. Training is teacher-forced on all target scales
with the release's bitwise loss; validation reports the teacher-forced loss and per-scale bit
accuracy, then *generates* edits on a fixed batch (KV cache, CFG) and scores them on decoded pixels
inside/outside the ground-truth mask against a copy-the-source baseline.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from omegaconf import DictConfig, OmegaConf
from torchmetrics import MeanMetric

from conditioning import build as build_strategy
from conditioning.base import ConditioningPlan
from varedit_lab.checkpoint_io import CheckpointError, load_weights
from varedit_lab.config import to_dict
from varedit_lab.metrics import EditQuality, MaskSplitScaleMetrics, ScaleBitAccuracy, per_sample_mask_split, scale_mask_weights
from varedit_lab.model.build import build_transformer
from varedit_lab.model.compat import check_finite, load_released
from varedit_lab.model.layout import ScaleSchedule
from varedit_lab.model.loss import bitwise_loss
from varedit_lab.model.transformer import TextFeatures
from varedit_lab.optim import adamw_with_schedule
from varedit_lab.runs import RunFolder
from varedit_lab.text import build_text_encoder
from varedit_lab.tokenizer.precompute import stored_targets

FROZEN_PREFIXES = ("tokenizer.", "text_encoder.")  # the frozen T5 case; a trainable text encoder trains and is saved
# Infinity's no-weight-decay parameters (besides biases and other 1-D tensors).
NO_DECAY_KEYS = ("cfg_uncond", "pos_start", "lvl_embed", "ada_gss", "scale_mul")


@dataclass
class EditInputs:
    source_latent: torch.Tensor  # (B, d, H, W) continuous
    target_bits: list[torch.Tensor]  # per scale (B, n_s, d')
    teacher_inputs: torch.Tensor  # (B, T - 1, d')
    text: TextFeatures | None


def select_text(text: TextFeatures, n: int) -> TextFeatures:
    return TextFeatures(text.features[:n], text.lengths[:n])


def build_tokenizer(cfg: DictConfig):
    from varedit_lab.tokenizer import BSQTokenizer, load_tokenizer

    if cfg.tokenizer.checkpoint:
        return load_tokenizer(cfg.tokenizer.checkpoint, cfg.tokenizer)
    return BSQTokenizer.from_config(cfg.tokenizer)


class EditorModule(pl.LightningModule):
    def __init__(self, cfg: DictConfig):
        super().__init__()
        self.cfg = cfg
        self.schedule = ScaleSchedule.from_scales(cfg.model.scales)
        self.strategy = build_strategy(cfg.conditioning.name, OmegaConf.to_container(cfg.conditioning.options))
        # Every random initial weight is a function of cfg.seed alone (not of what ran before): runs
        # paired by seed start from identical shared weights whatever their strategy.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            self._build_parts(cfg)
        k = self.schedule.num_scales

        self.val_loss = MeanMetric()
        self.val_bits = ScaleBitAccuracy(self.schedule.sizes)
        self.copy_bits = ScaleBitAccuracy(self.schedule.sizes)
        self.val_quality = EditQuality()
        self.copy_quality = EditQuality()
        self.val_split = MaskSplitScaleMetrics(self.schedule.grids)
        self._samples: dict[str, dict[str, Any]] = {}  # per-sample values of this validation (samples.jsonl)
        self._edits_done = 0
        self._grid: list[torch.Tensor] = []
        self._grid_captions: list[str] = []  # the instructions of the grid's rows
        self._latent_cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.num_scales = k

    def _build_parts(self, cfg: DictConfig) -> None:
        """Tokenizer, text encoder and transformer (in this order: the seed's stream is consumed alike)."""
        self.tokenizer = build_tokenizer(cfg).eval().requires_grad_(False)
        self.text_encoder = build_text_encoder(cfg.text)
        self.text_trainable = bool(self.text_encoder.trainable)
        if not self.text_trainable:
            self.text_encoder.requires_grad_(False)
        model_cfg = cfg.model
        if model_cfg.text_channels is None:
            model_cfg = OmegaConf.merge(model_cfg, {"text_channels": self.text_encoder.width})
        elif model_cfg.text_channels != self.text_encoder.width:
            raise ValueError(f"model.text_channels={model_cfg.text_channels} but the text encoder is {self.text_encoder.width} wide")
        if cfg.model.init_from:
            # Shapes on the meta device, storage from the (memory-mapped) file: no throw-away init.
            with torch.device("meta"):
                self.model = build_transformer(model_cfg, self.tokenizer.codebook_dim, self.tokenizer.apply_spatial_patchify)
            load_released(self.model, cfg.model.init_from)
        else:
            self.model = build_transformer(model_cfg, self.tokenizer.codebook_dim, self.tokenizer.apply_spatial_patchify)
        self.strategy.layout(self.schedule, cfg.model.rope_layout).check_depth(self.model.cfg.depth)
        if not cfg.model.cond_drop_rate:
            # Without text dropout the learned null text is never used in training: freeze it, so
            # that no trainable parameter goes without a gradient (DDP raises on those; sharded
            # optimizer state would miss it and a resume would fail).
            self.model.cfg_uncond.requires_grad_(False)

    # ---------------------------------------------------------------------------------------------
    # frozen parts
    def train(self, mode: bool = True) -> "EditorModule":
        super().train(mode)
        self.tokenizer.eval()
        if not self.text_trainable:
            self.text_encoder.eval()
        return self

    @property
    def frozen_prefixes(self) -> tuple[str, ...]:
        """State-dict prefixes of the frozen parts: rebuilt from config, never trained or saved."""
        return FROZEN_PREFIXES if not self.text_trainable else ("tokenizer.",)

    @property
    def rope_layout(self) -> str:
        return self.cfg.model.rope_layout

    @property
    def patchify(self) -> bool:
        return bool(self.tokenizer.apply_spatial_patchify)

    def flip_probs(self) -> list[float]:
        """Bitwise self-correction: one flip fraction per noised scale, drawn per batch."""
        n, strength = self.cfg.loss.bsc_scales, self.cfg.loss.bsc_strength
        if not self.training or n <= 0:
            return []
        steps = torch.randint(0, int(round(strength * 100)) + 1, (n,), generator=self.step_generator())
        return (steps.float() / 100).tolist()

    def step_generator(self, salt: int = 0) -> torch.Generator:
        """Randomness of a training step as a function of (seed, step, rank): resumes reproduce it."""
        seed = (self.cfg.seed * 1_000_003 + self.global_step * 10_007 + self.global_rank * 101 + salt) % (2**63)
        return torch.Generator().manual_seed(seed)

    def encode_batch(self, batch: dict[str, Any], flip_probs: list[float] = ()) -> EditInputs:
        with torch.no_grad():
            if "source_latent" in batch:
                inputs = self.stored_inputs(batch, flip_probs)
            else:
                source_latent, target_latent = self.latents(batch)
                target = self.tokenizer.quantize_latent(target_latent, self.schedule, flip_probs=flip_probs,
                                                        generator=self.step_generator(1))
                inputs = EditInputs(source_latent, target.bits, target.teacher_inputs, None)
        if inputs.text is None:  # a trainable encoder runs with gradients, outside no_grad
            inputs.text = self.encode_text(batch["instruction"])
        return inputs

    def encode_text(self, instructions: list[str]) -> TextFeatures:
        if self.text_trainable:
            return self.text_encoder.encode(instructions)
        with torch.no_grad():
            return self.text_encoder.encode(instructions).to(self.device)

    @torch.no_grad()
    def stored_inputs(self, batch: dict[str, Any], flip_probs: list[float] = ()) -> EditInputs:
        """Inputs of a batch from ``data precompute`` shards: no VAE, and no T5 when text is stored."""
        if flip_probs:
            raise ValueError("loss.bsc_scales > 0 flips bits of the continuous target latent, which precomputed shards do not "
                             "store: set loss.bsc_scales=0 or train from image shards")
        latent, packed = batch["source_latent"], batch["target_bits_packed"]
        d, channels = self.tokenizer.codebook_dim, self.tokenizer.token_channels
        if latent.shape[1] != d or packed.shape[1] != self.schedule.total or packed.shape[2] * 8 < channels:
            raise ValueError(
                f"precomputed shards hold latents of {latent.shape[1]} channels and {packed.shape[1]} target tokens of "
                f"{packed.shape[2] * 8} bits; this run needs {d} channels and {self.schedule.total} tokens of {channels} bits "
                f"(model.scales={list(self.cfg.model.scales)}): precompute again with this config"
            )
        per_scale, teacher = stored_targets(packed, self.schedule, self.patchify, d)
        if "text_features" in batch and not self.text_trainable:  # a trainable encoder reads the words
            if batch["text_features"].shape[-1] != self.text_encoder.width:
                raise ValueError(f"precomputed text features are {batch['text_features'].shape[-1]} wide; the text encoder is {self.text_encoder.width}")
            text = TextFeatures(batch["text_features"], batch["text_lengths"])
        else:
            text = None  # encode_batch encodes it (with gradients when the encoder trains)
        return EditInputs(latent, per_scale, teacher, text)

    @torch.no_grad()
    def latents(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Continuous source and target latents of a batch, from the frozen tokenizer.

        With ``data.cache_latents`` the latents of each training sample are kept by sample key (the
        tokenizer is frozen and the images deterministic, so they never change): small datasets
        such as the synthetic benchmark then pay the VAE once per sample, not once per step.
        """
        keys = batch.get("key") if (self.training and self.cfg.data.cache_latents) else None
        if keys is None:
            return self.tokenizer.encode_latent(batch["source"]), self.tokenizer.encode_latent(batch["target"])
        missing = [i for i, key in enumerate(keys) if key not in self._latent_cache]
        if missing:
            images = torch.cat([batch["source"][missing], batch["target"][missing]])
            encoded = self.tokenizer.encode_latent(images).cpu()
            for j, i in enumerate(missing):
                self._latent_cache[keys[i]] = (encoded[j], encoded[len(missing) + j])
        pairs = [self._latent_cache[key] for key in keys]
        device = batch["source"].device
        return torch.stack([p[0] for p in pairs]).to(device), torch.stack([p[1] for p in pairs]).to(device)

    def plan(self, source_latent: torch.Tensor) -> ConditioningPlan:
        return self.strategy.plan(source_latent, self.schedule, self.rope_layout, self.patchify)

    # ---------------------------------------------------------------------------------------------
    # training
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        inputs = self.encode_batch(batch, self.flip_probs())
        logits = self.model(self.plan(inputs.source_latent), inputs.teacher_inputs, inputs.text, generator=self.step_generator(2))
        out = bitwise_loss(logits, torch.cat(inputs.target_bits, 1), self.schedule, self.cfg.loss.reweight_by_scale, self.cfg.loss.label_smoothing)
        if not torch.isfinite(out.loss):
            raise FloatingPointError(
                f"non-finite training loss ({out.loss.item()}) at step {self.global_step}; "
                f"stopping. Try a lower optim.lr (now {self.cfg.optim.lr}) or check the inputs."
            )
        batch_size = inputs.teacher_inputs.shape[0]
        self.log("train/loss", out.loss, prog_bar=True, batch_size=batch_size)
        self.log("train/bit_acc", out.scale_bit_acc.mean(), batch_size=batch_size)
        for k in range(self.num_scales):
            self.log(f"train/scale{k}_loss", out.scale_loss[k], batch_size=batch_size)
            self.log(f"train/scale{k}_bit_acc", out.scale_bit_acc[k], batch_size=batch_size)
        return out.loss

    def configure_model(self) -> None:
        """Lightning calls this before wrapping and before ``configure_optimizers`` (so the optimizer
        sees sharded parameters): FSDP2 sharding per block, FSDP1 frozen-part handling, compiled
        blocks. A no-op under DDP/single device unless ``model.compile_blocks``."""
        from varedit_lab.distributed import configure_editor_model

        configure_editor_model(self)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Lightning's norm clipping refuses FSDP1 (each rank sees only its shard's norm); the FSDP
        root computes the global norm instead (see varedit_lab.distributed.clip_fsdp1_gradients)."""
        from varedit_lab.distributed import clip_fsdp1_gradients

        if not clip_fsdp1_gradients(self, gradient_clip_val, gradient_clip_algorithm):
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def configure_optimizers(self):
        decay, no_decay = [], []
        trainable = list(self.model.named_parameters())
        if self.text_trainable:
            trainable += [(f"text_encoder.{n}", p) for n, p in self.text_encoder.named_parameters()]
        for name, param in trainable:
            if not param.requires_grad:
                continue
            (no_decay if param.ndim < 2 or any(k in name for k in NO_DECAY_KEYS) else decay).append(param)
        return adamw_with_schedule(decay, no_decay, self.cfg.optim, self.cfg.trainer.max_steps)

    # ---------------------------------------------------------------------------------------------
    # validation
    def on_validation_epoch_start(self) -> None:
        self._edits_done = 0
        self._grid = []
        self._samples = {}

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        # Every rank runs the same forwards and generations on its whole batch, padding rows
        # (valid=False) included, and masks those out of the metrics: under fsdp/fsdp2 every forward
        # is a collective, so a rank that skipped one (an all-padding batch) would hang the others.
        inputs = self.encode_batch(batch)
        plan = self.plan(inputs.source_latent)
        target_bits = torch.cat(inputs.target_bits, 1)
        logits = self.model(plan, inputs.teacher_inputs, inputs.text)
        source_bits = self.tokenizer.encode_target(batch["source"], self.schedule).bits
        keep = batch["valid"].bool().to(logits.device) if "valid" in batch else torch.ones(len(target_bits), dtype=torch.bool, device=logits.device)
        if keep.any():  # metrics sync at epoch end
            out = bitwise_loss(logits[keep], target_bits[keep], self.schedule, self.cfg.loss.reweight_by_scale)
            self.val_loss.update(out.loss, weight=int(keep.sum()))
            predicted = (logits[keep].unflatten(-1, (-1, 2)).argmax(-1)).to(torch.uint8)
            self.val_bits.update(predicted, target_bits[keep])
            self.copy_bits.update(torch.cat(source_bits, 1)[keep], target_bits[keep])
            self._mask_split(batch, out.ce_per_token, predicted, target_bits[keep], keep)
        self._validation_edits(batch, plan, inputs.text, source_bits, keep)

    def _mask_split(self, batch: dict[str, Any], ce_per_token: torch.Tensor, predicted: torch.Tensor, target_bits: torch.Tensor,
                    keep: torch.Tensor) -> None:
        """Teacher-forced CE / bit accuracy per scale inside and outside the edit mask (rows ``keep``)."""
        if "mask" not in batch:
            return
        has_mask = batch["has_mask"].bool().to(keep.device)[keep]
        if not has_mask.any():
            return
        inside = scale_mask_weights(batch["mask"][keep][has_mask].to(ce_per_token.device), self.schedule.grids)
        bit_acc = (predicted == target_bits.to(predicted.dtype)).float().mean(-1)
        self.val_split.update(ce_per_token[has_mask], bit_acc[has_mask], inside)
        per_sample = per_sample_mask_split(ce_per_token[has_mask], inside, self.schedule.grids)
        rows = [i for i, k in enumerate(keep.tolist()) if k]
        rows = [r for r, m in zip(rows, has_mask.tolist()) if m]
        for j, row in enumerate(rows):
            self._sample_record(batch, row).update({name: float(v[j]) for name, v in per_sample.items()})

    def _sample_record(self, batch: dict[str, Any], row: int) -> dict[str, Any]:
        key = str(batch["key"][row]) if "key" in batch else f"row{len(self._samples)}"
        kind = str(batch["kind"][row]) if "kind" in batch else ""
        return self._samples.setdefault(key, {"key": key, "kind": kind})

    def _validation_edits(
        self, batch: dict[str, Any], plan: ConditioningPlan, text: TextFeatures, source_bits: list[torch.Tensor], keep: torch.Tensor
    ) -> None:
        """Generate edits for the first ``sampling.num_val_edits`` rows (the same count on every
        rank, see validation_step) and score the valid ones on pixels.

        The baseline copies the source *through the tokenizer* (decode of the source's own bits):
        the best a model can do by copying, at the same reconstruction quality as its edits.
        """
        n = min(self.cfg.sampling.num_val_edits - self._edits_done, plan.source_tokens.shape[0])
        if n <= 0:
            return
        images = self.edit(ConditioningPlan(plan.layout, plan.source_tokens[:n]), select_text(text, n), seed=self._edits_done)
        source, target = batch["source"][:n], batch["target"][:n]
        has_mask = batch["has_mask"][:n].bool() if "has_mask" in batch else torch.zeros(n, dtype=torch.bool)
        has_mask = has_mask & keep[:n].to(has_mask.device)
        if has_mask.any():
            mask = batch["mask"][:n][has_mask]
            copied = self.tokenizer.decode([b[:n] for b in source_bits], self.schedule)
            edited = EditQuality.per_sample(images[has_mask], source[has_mask], target[has_mask], mask)
            copy = EditQuality.per_sample(copied[has_mask], source[has_mask], target[has_mask], mask)
            self.val_quality.update(values=edited)
            self.copy_quality.update(values=copy)
            for j, row in enumerate(torch.nonzero(has_mask).flatten().tolist()):
                record = self._sample_record(batch, row)
                record.update({name: float(edited[name][j]) for name in ("success", "preservation", "balance")})
                record.update({f"copy_{name}": float(copy[name][j]) for name in ("success", "preservation", "balance")})
        if not self._grid:
            self._grid = [source.cpu(), target.cpu(), images.cpu()]
            self._grid_captions = [str(t) for t in batch.get("instruction", [""] * n)[:n]]
        self._edits_done += n

    @torch.no_grad()
    def edit(self, plan: ConditioningPlan, text: TextFeatures, seed: int = 0) -> torch.Tensor:
        """Generate edited images (B, 3, H, W) in [-1, 1] with the configured sampling settings."""
        s = self.cfg.sampling
        generator = torch.Generator(device=plan.source_tokens.device).manual_seed(self.cfg.seed * 7919 + seed)
        gen = self.model.generate(plan, text, cfg=s.cfg, tau=s.tau, top_k=s.top_k, top_p=s.top_p, greedy=s.greedy, generator=generator)
        return self.tokenizer.decode(gen.bits, self.schedule)

    def on_validation_epoch_end(self) -> None:
        # Every rank calls compute(): torchmetrics syncs the states (no per-step sync_dist logging,
        # which hangs when ranks log different keys).
        self.log("val/loss", self.val_loss.compute())
        self.val_loss.reset()
        for prefix, bits, quality in (("val/", self.val_bits, self.val_quality), ("val/copy_", self.copy_bits, self.copy_quality)):
            values = {**bits.compute(), **quality.compute()}  # NaN where nothing was measured
            for name, value in values.items():
                if not torch.isnan(value):
                    self.log(prefix + name, value)
            bits.reset()
            quality.reset()
        for name, value in self.val_split.compute().items():
            if not torch.isnan(value):
                self.log("val/" + name, value)
        self.val_split.reset()
        self._write_samples()
        if self._grid and self.trainer.is_global_zero and not self.trainer.sanity_checking:
            self._save_grid()

    def _write_samples(self) -> None:
        """``samples.jsonl``: one line per validation sample (all ranks' samples, by key), so that runs
        can be paired sample by sample across strategies (sweep reports)."""
        records = list(self._samples.values())
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, records)
            records = [r for part in gathered for r in part]
        if not self.trainer.is_global_zero or self.trainer.sanity_checking or not records:
            return
        path = RunFolder(self.trainer.default_root_dir).samples
        path.parent.mkdir(parents=True, exist_ok=True)
        merged: dict[str, dict[str, Any]] = {}
        for record in records:
            merged.setdefault(record["key"], {}).update(record)
        def finite(value: Any) -> Any:  # NaN (not measured) is written as null: strict JSON
            return None if isinstance(value, float) and not math.isfinite(value) else value

        lines = [json.dumps({"step": self.global_step, **{k: finite(v) for k, v in merged[key].items()}}, sort_keys=True)
                 for key in sorted(merged)]
        path.write_text("\n".join(lines) + "\n")

    def _save_grid(self) -> None:
        from varedit_lab.images import labelled_grid, save_image

        grid = labelled_grid(self._grid, self._grid_captions)
        run_dir = Path(self.trainer.default_root_dir)
        path = save_image(grid, run_dir / "val_edits" / f"step{self.global_step:06d}.png")
        for logger in self.loggers:
            if hasattr(logger, "log_image") and self.cfg.logger.log_images:
                logger.log_image(key="val/edits", images=[str(path)], caption=["source | target | edit, the instruction under each row"], step=self.global_step)

    # ---------------------------------------------------------------------------------------------
    # checkpoints: the frozen tokenizer / text encoder are rebuilt from config, not saved
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        from varedit_lab.distributed import saves_sharded_checkpoints

        # Sharded (fsdp/fsdp2 DCP) checkpoints keep the frozen parts: on resume the strategy loads the
        # module's whole state dict from the shards itself, and DCP rejects missing keys.
        if not (self._trainer is not None and saves_sharded_checkpoints(self._trainer.strategy)):
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith(self.frozen_prefixes)}
        checkpoint["varedit_config"] = to_dict(self.cfg)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("state_dict")
        if state is None:  # sharded checkpoint: the strategy has already loaded the weights
            return
        for key, value in self.state_dict().items():
            if key.startswith(self.frozen_prefixes):
                state.setdefault(key, value)

    @classmethod
    def from_checkpoint(cls, path: str | Path, overrides: list[str] | None = None, map_location: str = "cpu") -> "EditorModule":
        """Rebuild a trained editor from a Lightning checkpoint (its config travels inside)."""
        from varedit_lab.config import config_from_dict

        checkpoint = load_weights(path, "editor checkpoint", map_location=map_location)
        if not isinstance(checkpoint, dict) or "varedit_config" not in checkpoint:
            raise CheckpointError(f"{path}: not a varedit-lab editor checkpoint (no 'varedit_config'); "
                                  "released weights go with --released, reference fixtures with --fixture")
        check_finite(checkpoint["state_dict"], str(path))
        module = cls(config_from_dict(checkpoint["varedit_config"], overrides or [], source=str(path)))
        module.on_load_checkpoint(checkpoint)
        module.load_state_dict(checkpoint["state_dict"], strict=True)
        return module.eval()
