"""Lightning callback: attention probes on a fixed validation batch, every N validation epochs.

The first ``num_samples`` samples of the first validation batch a rank sees are kept (on CPU) and
probed at the end of every ``every_n_val``-th validation epoch (sanity checks excluded). Every rank
runs the probe forward, because under FSDP the parameters are all-gathered collectively; only rank
0 writes ``probe.json`` and the PNGs under ``{out_dir or default_root_dir/probes}/step{N}`` and logs
the scalars (:meth:`ProbeResult.scalars`) and images to the trainer's loggers.

The probe runs outside the validation loop's ``inference_mode`` (under ``no_grad``): the model caches
tensors created during a forward (RoPE tables), and inference tensors there would break training.
The module must provide ``model`` (a ``VAREditTransformer``), ``encode_batch(batch)`` and
``plan(source_latent)``, as ``varedit_lab.module.EditorModule`` does; override
:meth:`ProbeCallback.probe_inputs` for other modules.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn

from conditioning.base import ConditioningPlan, SequenceLayout
from varedit_lab.model.transformer import TextFeatures
from varedit_lab.probes.probe import DEFAULT_MAP_BYTES, AttentionProbe, MapRequest, ProbeBudgetError, probe_model
from varedit_lab.probes.stats import ProbeResult


def _head(batch: Any, n: int) -> Any:
    """The first ``n`` samples of a collated batch, detached onto the CPU (dicts, lists, tensors)."""
    if isinstance(batch, torch.Tensor):
        return batch[:n].detach().to("cpu", copy=True)
    if isinstance(batch, dict):
        return {key: _head(value, n) for key, value in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(batch[:n])
    return batch


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {key: _to_device(value, device) for key, value in batch.items()}
    return batch


class ProbeCallback(pl.Callback):
    """Probe ``layers``/``heads`` (None: all) on ``num_samples`` fixed validation samples.

    ``map_layers``: layers whose whole-sequence head-mean map is kept for the paper-style image
    (None: the first and last probed layer; maps that exceed ``max_map_bytes`` are skipped with a
    warning rather than failing the run).
    """

    def __init__(
        self,
        every_n_val: int = 1,
        layers: Sequence[int] | None = None,
        heads: Sequence[int] | None = None,
        num_samples: int = 4,
        radius: float = 1.0,
        map_layers: Sequence[int] | None = None,
        max_map_bytes: int = DEFAULT_MAP_BYTES,
        log_images: bool = True,
        out_dir: str | Path | None = None,
    ):
        if every_n_val < 1 or num_samples < 1:
            raise ValueError(f"every_n_val={every_n_val} and num_samples={num_samples} must be >= 1")
        self.every_n_val, self.num_samples = every_n_val, num_samples
        self.layers = None if layers is None else list(layers)
        self.heads = None if heads is None else list(heads)
        self.radius, self.map_layers, self.max_map_bytes = radius, map_layers, max_map_bytes
        self.log_images = log_images
        self.out_dir = None if out_dir is None else Path(out_dir)
        self.batch: Any = None  # the fixed batch (CPU), captured on the first validation batch
        self.val_epochs = 0
        self.last_result: ProbeResult | None = None
        self.last_dir: Path | None = None

    @classmethod
    def from_config(cls, probes: Any) -> "ProbeCallback":
        """From the run config's ``probes`` section (:class:`varedit_lab.config.ProbesConfig`): empty
        ``layers``/``heads`` mean all; ``map_layers`` null means the first and last probed layer."""
        map_layers = getattr(probes, "map_layers", None)
        return cls(
            every_n_val=int(probes.every_n_val),
            layers=list(probes.layers) or None,
            heads=list(probes.heads) or None,
            num_samples=int(probes.num_samples),
            radius=float(probes.radius),
            map_layers=None if map_layers is None else list(map_layers),
            log_images=bool(getattr(probes, "log_images", True)),
        )

    # -- hooks --------------------------------------------------------------------------------------
    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        if self.batch is None and batch_idx == 0 and dataloader_idx == 0 and not trainer.sanity_checking:
            self.batch = _head(batch, self.num_samples)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or self.batch is None:
            return
        self.val_epochs += 1
        if self.val_epochs % self.every_n_val:
            return
        result = self.run(pl_module)  # on every rank
        self.last_result = result
        if trainer.is_global_zero:
            self.last_dir = self.write_and_log(trainer, result)

    # -- work ---------------------------------------------------------------------------------------
    def probe_inputs(self, pl_module: pl.LightningModule, batch: Any) -> tuple[ConditioningPlan, torch.Tensor, TextFeatures]:
        """(plan, teacher inputs, text) of the fixed batch; override for modules without
        ``encode_batch``/``plan``."""
        inputs = pl_module.encode_batch(_to_device(batch, pl_module.device))
        return pl_module.plan(inputs.source_latent), inputs.teacher_inputs, inputs.text

    def map_requests(self, model: torch.nn.Module, layout: SequenceLayout) -> list[MapRequest]:
        """Whole-sequence maps of ``map_layers``, or none when they exceed the byte budget."""
        probe = AttentionProbe(model, self.layers, self.heads)
        depth = max(probe.modules) + 1
        wanted = self.map_layers if self.map_layers is not None else [probe.layers[0], probe.layers[-1]]
        chosen = sorted({layer % depth for layer in wanted} & set(probe.layers))
        maps = [MapRequest(layer) for layer in chosen]
        probe.maps, probe.max_map_bytes = tuple(maps), self.max_map_bytes
        try:
            probe.check_budget(layout)
        except ProbeBudgetError as err:
            rank_zero_warn(f"ProbeCallback: skipping full attention maps: {err}")
            return []
        return maps

    def run(self, pl_module: pl.LightningModule) -> ProbeResult:
        with torch.inference_mode(False), torch.no_grad():
            plan, teacher_inputs, text = self.probe_inputs(pl_module, self.batch)
            maps = self.map_requests(pl_module.model, plan.layout)
            return probe_model(
                pl_module.model, plan, teacher_inputs, text, self.layers, self.heads,
                maps=maps, radius=self.radius, max_map_bytes=self.max_map_bytes,
            )

    def write_and_log(self, trainer: pl.Trainer, result: ProbeResult) -> Path:
        """probe.json + PNGs in the step directory; scalars and images to every logger (rank 0)."""
        from varedit_lab.probes.plots import save_all

        step = trainer.global_step
        root = self.out_dir if self.out_dir is not None else Path(trainer.default_root_dir) / "probes"
        directory = root / f"step{step:06d}"
        result.save_json(directory / "probe.json", config={"global_step": step, "epoch": trainer.current_epoch, "num_samples": self.num_samples})
        pngs = save_all(result, directory) if self.log_images else []
        scalars = result.scalars("probe")
        for logger in trainer.loggers:
            logger.log_metrics(scalars, step=step)
            if pngs and hasattr(logger, "log_image"):
                for png in pngs:
                    logger.log_image(key=f"probe/{png.stem}", images=[str(png)], step=step)
        return directory
