"""Multi-process training on Lightning's strategies: construction, model preparation, checkpoint
consolidation, and the start-up topology check.

``trainer.strategy`` picks one of:

``auto`` / ``ddp`` / ``ddp_spawn`` / ``ddp_fork``
    Lightning's own names; every rank holds the whole model (fine up to the 2.2 B model on 80 GB).
``fsdp``
    Lightning ``FSDPStrategy`` (FSDP1, GPUs only): one wrap unit per transformer block
    (``CrossAttnBlock``), the rest of the trunk in the root unit, ``use_orig_params``, sharded (DCP)
    checkpoints, Lightning's per-block activation checkpointing. The frozen tokenizer and text
    encoder are FSDP ``ignored_modules``: the editor calls their ``encode`` methods, not
    ``forward``, which an FSDP unit would not all-gather for (and FSDP1 wants uniform
    ``requires_grad`` per flat parameter). Norm clipping goes through the FSDP root. Validation
    edits are not supported (``sampling.num_val_edits=0``, see :func:`prepare_for_fsdp1`).
``fsdp2``
    Lightning ``ModelParallelStrategy(data_parallel_size=world, tensor_parallel_size=1)``; the
    editor's ``configure_model`` applies FSDP2 ``fully_shard`` per block and on the trunk root. The
    frozen parts stay plain replicated modules. Also runs on CPU with gloo (tests, ``fsdp2_sim``).

The optimizer is always built by ``configure_optimizers``, which Lightning calls after
``configure_model`` and (FSDP1) after wrapping, so it holds the sharded parameters.

Mixed precision is Lightning's ``trainer.precision`` (``bf16-mixed``: autocast). Sharded parameters,
their all-gathers and the gradient reduction stay float32 for both FSDP flavours: the numerics of
DDP's ``bf16-mixed``, which is what the CPU tests can check (casting the parameters themselves to
bf16 is the next MFU step once verified on GPUs; see ``benchmarks/gpu_fsdp_smoke.py``).

Sharded checkpoints keep the frozen parts (Lightning reloads the whole module state from the
shards); :func:`export_trunk` (``varedit-lab export``) consolidates the trunk into one file.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info

from varedit_lab.checkpoint_io import (
    SHARDED_METADATA_FILE,
    SafeFileSystemReader,
    check_sharded_checkpoint,
    is_checkpoint,
    is_sharded_checkpoint,
    load_weights,
)

if TYPE_CHECKING:
    from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

# ------------------------------------------------------------------------------------------------
# strategy construction


def resolve_devices(trainer_cfg: Any) -> int:
    """Processes per node: ``trainer.devices``, or every visible GPU for ``-1``."""
    devices = int(trainer_cfg.devices)
    if devices > 0:
        return devices
    if trainer_cfg.accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available():
        return torch.cuda.device_count()
    raise ValueError(
        f"trainer.devices={devices}: cannot count the devices on accelerator {trainer_cfg.accelerator!r}; "
        "set trainer.devices to the number of processes per node"
    )


def fsdp_strategy(cfg: Any) -> "FSDPStrategy":
    """FSDP1 through Lightning: a wrap unit per block, activation checkpointing per block when
    ``model.activation_checkpointing`` (the trunk's own checkpointing is then switched off in
    :func:`prepare_for_fsdp1` so that blocks are not recomputed twice)."""
    from lightning.pytorch.strategies import FSDPStrategy
    from torch.distributed.fsdp import MixedPrecision

    from varedit_lab.model.blocks import CrossAttnBlock

    kwargs: dict[str, Any] = {}
    if cfg.model.activation_checkpointing:
        kwargs["activation_checkpointing_policy"] = {CrossAttnBlock}
    if cfg.trainer.precision == "bf16-mixed":
        # Lightning's bf16-mixed default for FSDP casts parameters, buffers *and* the gradient
        # reduction to bf16; keep them float32 and let autocast run the matmuls in bf16.
        fp32 = torch.float32
        kwargs["mixed_precision"] = MixedPrecision(param_dtype=fp32, reduce_dtype=fp32, buffer_dtype=fp32, cast_root_forward_inputs=False)
    return FSDPStrategy(
        auto_wrap_policy={CrossAttnBlock},
        sharding_strategy="FULL_SHARD",
        use_orig_params=True,
        state_dict_type="sharded",  # Lightning's Trainer default is "full": a rank-0 gather that OOMs at 8B
        limit_all_gathers=True,
        **kwargs,
    )


def fsdp2_strategy(cfg: Any) -> "ModelParallelStrategy":
    """FSDP2 through Lightning: pure data parallelism over every process (the sharding itself is
    applied by the editor's ``configure_model``)."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    world = resolve_devices(cfg.trainer) * int(cfg.trainer.num_nodes)
    # "auto" would mean data_parallel=num_nodes, tensor_parallel=devices: not what we want.
    return ModelParallelStrategy(data_parallel_size=world, tensor_parallel_size=1, save_distributed_checkpoint=True)


def saves_sharded_checkpoints(strategy: Any) -> bool:
    """Whether ``strategy`` writes DCP directories (one shard per rank) instead of one file."""
    from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

    if isinstance(strategy, ModelParallelStrategy):
        return bool(getattr(strategy, "_save_distributed_checkpoint", True))
    if isinstance(strategy, FSDPStrategy):
        return getattr(strategy, "_state_dict_type", "full") == "sharded"
    return False



# ------------------------------------------------------------------------------------------------
# model preparation (called from EditorModule.configure_model)


def _fully_shard_api() -> tuple[Any, Any]:
    try:  # torch >= 2.6
        from torch.distributed.fsdp import FSDPModule, fully_shard
    except ImportError:  # torch 2.4 / 2.5
        from torch.distributed._composable.fsdp import FSDPModule, fully_shard
    return FSDPModule, fully_shard


def shard_trunk(model: torch.nn.Module, mesh: Any) -> bool:
    """FSDP2: ``fully_shard`` each block, then the trunk root (the embeddings, text path and head).
    Returns False when already sharded (Lightning calls ``configure_model`` again for validate/test)."""
    FSDPModule, fully_shard = _fully_shard_api()
    if isinstance(model, FSDPModule):
        return False
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    for name in UNSHARDED_METHODS:
        setattr(model, name, _unsharded(getattr(model, name), model, list(model.blocks)))
    return True


# FSDP2 all-gathers a unit's parameters around forward() only. Inference entry points that read
# parameters outside forward (model.generate() precomputes every block's text constants and the
# head's modulation) run with the whole trunk all-gathered instead.
UNSHARDED_METHODS = ("generate",)


def _unsharded(method: Any, root: Any, blocks: list[Any]) -> Any:
    """``method`` with the trunk root and every block unsharded for its whole duration (the blocks'
    own forwards inside it do not reshard), resharded afterwards. Peak memory: the full trunk per
    rank, during validation edits only."""

    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        for block in blocks:
            block.set_reshard_after_forward(False)
        for unit in (root, *blocks):
            unit.unshard()
        try:
            return method(*args, **kwargs)
        finally:
            for unit in (root, *blocks):
                unit.reshard()
            for block in blocks:
                block.set_reshard_after_forward(True)  # fully_shard's default for non-root units

    return wrapper


def frozen_modules(module: pl.LightningModule) -> list[torch.nn.Module]:
    """The editor's frozen submodules (tokenizer, and the text encoder unless it trains)."""
    prefixes = getattr(module, "frozen_prefixes", ("tokenizer.", "text_encoder."))
    return [module.get_submodule(prefix.rstrip(".")) for prefix in prefixes if hasattr(module, prefix.rstrip("."))]


def prepare_for_fsdp1(module: pl.LightningModule, strategy: "FSDPStrategy") -> None:
    """FSDP1 wraps the whole LightningModule (root unit) after ``configure_model``. Declare the
    frozen parts as ``ignored_modules`` and move them to the device (FSDP moves only what it
    manages). (A single frozen trunk parameter, ``cfg_uncond`` without text dropout, is fine:
    ``use_orig_params=True`` allows mixed ``requires_grad`` in a unit.)"""
    if module.cfg.sampling.num_val_edits > 0:
        # generate() reads every block's parameters outside the block's forward (text constants);
        # FSDP1 cannot all-gather them from inside the root unit's forward, where validation runs.
        raise ValueError(
            f"trainer.strategy=fsdp cannot generate validation edits (sampling.num_val_edits="
            f"{module.cfg.sampling.num_val_edits}): set sampling.num_val_edits=0 (the fsdp preset does), "
            "or use trainer.strategy=fsdp2"
        )
    frozen = frozen_modules(module)
    ignored = list(strategy.kwargs.get("ignored_modules") or [])
    strategy.kwargs["ignored_modules"] = ignored + [m for m in frozen if not any(m is i for i in ignored)]
    for m in frozen:
        m.to(strategy.root_device)
    if strategy._activation_checkpointing_kwargs and module.model.cfg.activation_checkpointing:
        # Lightning wraps every block in a checkpoint wrapper; the trunk's own per-block
        # checkpointing would recompute each block a second time.
        module.model.cfg = dataclasses.replace(module.model.cfg, activation_checkpointing=False)


def clip_fsdp1_gradients(module: pl.LightningModule, max_norm: float | None, algorithm: str | None) -> bool:
    """Under FSDPStrategy, clip by the global gradient norm through the FSDP root's
    ``clip_grad_norm_`` (Lightning's precision plugin raises for norm clipping there). Returns
    False (nothing done) under any other strategy."""
    from lightning.pytorch.strategies import FSDPStrategy

    strategy = module._trainer.strategy if module._trainer is not None else None
    if not isinstance(strategy, FSDPStrategy):
        return False
    if max_norm:
        if algorithm not in (None, "norm"):
            raise ValueError(f"trainer.strategy=fsdp supports gradient clipping by norm only, not {algorithm!r}")
        strategy.model.clip_grad_norm_(max_norm)
    return True


def compile_blocks(model: torch.nn.Module) -> int:
    """``torch.compile`` each transformer block in place (regional compilation: one graph reused by
    every block, parameter names unchanged). Returns how many blocks were newly compiled."""
    n = 0
    for block in model.blocks:
        if getattr(block, "_compiled_call_impl", None) is None:
            block.compile()
            n += 1
    return n


def configure_editor_model(module: pl.LightningModule) -> None:
    """Prepare the editor's trunk for the strategy it runs under; idempotent.

    - ModelParallelStrategy (``fsdp2``): ``fully_shard`` per block and on the trunk.
    - FSDPStrategy (``fsdp``): frozen parts become ignored modules (see :func:`prepare_for_fsdp1`).
    - anything else: nothing to shard.
    Then ``model.compile_blocks`` compiles each block (lazily: tracing happens at the first call,
    after every wrapper is in place).
    """
    from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

    strategy = module._trainer.strategy if module._trainer is not None else None
    if isinstance(strategy, ModelParallelStrategy):
        if shard_trunk(module.model, module.device_mesh["data_parallel"]):
            rank_zero_info(f"fsdp2: fully_shard on {len(module.model.blocks)} blocks + trunk root, mesh {module.device_mesh}")
    elif isinstance(strategy, FSDPStrategy):
        prepare_for_fsdp1(module, strategy)
    if module.cfg.model.compile_blocks and compile_blocks(module.model):
        rank_zero_info(f"torch.compile: {len(module.model.blocks)} blocks (compiled at their first call)")


# ------------------------------------------------------------------------------------------------
# checkpoints: consolidation and export

# Where each Lightning strategy puts the LightningModule's state dict inside a DCP checkpoint:
# ModelParallelStrategy saves {"state_dict": ...}, FSDPStrategy {"model": ...}; the trunk is the
# LightningModule's ``model`` attribute in both.
_DCP_TRUNK_PREFIXES = ("state_dict.model.", "model.model.")
# Wrapper segments that torch.compile / checkpoint wrappers / FSDP1 can leave in parameter names.
_WRAPPER_SEGMENTS = ("_orig_mod.", "_checkpoint_wrapped_module.", "_fsdp_wrapped_module.")


@dataclass
class TrunkCheckpoint:
    """The transformer weights of a training checkpoint, in our key layout (``blocks.{i}.…``)."""

    state_dict: dict[str, torch.Tensor]
    config: dict[str, Any]  # the run config saved with the checkpoint ("varedit_config")
    global_step: int | None
    source: str  # "file" or "sharded (<top-level key>)"


def _clean_key(key: str) -> str:
    for segment in _WRAPPER_SEGMENTS:
        key = key.replace(segment, "")
    return key


def _trunk_from_file(path: Path) -> TrunkCheckpoint:
    checkpoint = load_weights(path, "editor checkpoint")
    if "varedit_config" not in checkpoint:
        raise ValueError(f"{path}: not a varedit-lab editor checkpoint (no 'varedit_config')")
    state = {_clean_key(k[len("model."):]): v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")}
    return TrunkCheckpoint(state, checkpoint["varedit_config"], checkpoint.get("global_step"), "file")


def _trunk_from_dcp(path: Path) -> TrunkCheckpoint:
    """Read only the trunk's tensors from a DCP directory, each assembled from every rank's shards by
    ``torch.distributed.checkpoint`` itself (no process group; optimizer state is not loaded)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    entries = check_sharded_checkpoint(path).state_dict_metadata
    reader = SafeFileSystemReader(str(path))
    prefix = next((p for p in _DCP_TRUNK_PREFIXES if any(k.startswith(p) for k in entries)), None)
    if prefix is None:
        raise ValueError(f"{path}: no transformer weights (keys {_DCP_TRUNK_PREFIXES}) in this sharded checkpoint")
    template = {
        key: torch.empty(meta.size, dtype=meta.properties.dtype)
        for key, meta in entries.items()
        if key.startswith(prefix) and isinstance(meta, TensorStorageMetadata)
    }
    with warnings.catch_warnings():  # "torch.distributed is ... uninitialized": intended, offline
        warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process.*")
        dcp.load(template, storage_reader=reader, no_dist=True)
    meta = load_weights(path / SHARDED_METADATA_FILE, "sharded-checkpoint trainer state")
    if "varedit_config" not in meta:
        raise ValueError(f"{path}: not a varedit-lab editor checkpoint (no 'varedit_config' in {SHARDED_METADATA_FILE})")
    state = {_clean_key(k[len(prefix):]): v for k, v in template.items()}
    return TrunkCheckpoint(state, meta["varedit_config"], meta.get("global_step"), f"sharded ({prefix.split('.')[0]})")


def load_trunk_checkpoint(path: str | os.PathLike) -> TrunkCheckpoint:
    """The trunk weights of a Lightning checkpoint file (single process, DDP) or a sharded DCP
    directory (fsdp, fsdp2), consolidated on CPU."""
    path = Path(path)
    if path.is_file():
        return _trunk_from_file(path)
    if is_sharded_checkpoint(path):
        return _trunk_from_dcp(path)
    raise FileNotFoundError(f"{path}: neither a checkpoint file nor a complete sharded checkpoint directory (.metadata + {SHARDED_METADATA_FILE})")


def trunk_model_config(config: dict[str, Any], state_dict: Mapping[str, torch.Tensor]) -> Any:
    """The TransformerConfig a checkpoint was trained with (text width read off ``cfg_uncond``)."""
    from varedit_lab.config import config_from_dict
    from varedit_lab.model.build import transformer_config

    cfg = config_from_dict(config)
    model_cfg = cfg.model
    if model_cfg.text_channels is None and "cfg_uncond" in state_dict:
        model_cfg.text_channels = int(state_dict["cfg_uncond"].shape[1])
    return transformer_config(model_cfg, cfg.tokenizer.codebook_dim, cfg.tokenizer.apply_spatial_patchify)


def verify_loadable(state_dict: Mapping[str, torch.Tensor], model_config: Any) -> None:
    """Strict key/shape check against the model (built on the meta device: no memory, any size);
    raises :class:`~varedit_lab.model.compat.CheckpointError` naming every problem."""
    from varedit_lab.model.compat import load_state_dict_strict
    from varedit_lab.model.transformer import VAREditTransformer

    with torch.device("meta"):
        model = VAREditTransformer(model_config)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*copying from a non-meta parameter.*")
        load_state_dict_strict(model, state_dict)


def export_trunk(checkpoint: str | os.PathLike, out: str | os.PathLike, released_layout: bool = False) -> dict[str, Any]:
    """Write the trunk of ``checkpoint`` as one flat ``.pth`` state dict (the released file format,
    ``reference-model.md`` §14): our ``blocks.{i}`` keys, or with ``released_layout`` the release's
    ``block_chunks.{c}.module.{j}`` keys plus its zero buffers. The run config goes next to it as
    ``<out stem>.config.yaml``. Verified loadable before writing. Returns a summary."""
    from varedit_lab.config import config_from_dict, save_config
    from varedit_lab.model.compat import to_released

    trunk = load_trunk_checkpoint(checkpoint)
    model_config = trunk_model_config(trunk.config, trunk.state_dict)
    state = to_released(trunk.state_dict, model_config.block_chunks) if released_layout else trunk.state_dict
    verify_loadable(state, model_config)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, out)
    config_path = save_config(config_from_dict(trunk.config), out.with_suffix(".config.yaml"))
    return {
        "out": str(out),
        "config": str(config_path),
        "layout": "released" if released_layout else "varedit-lab",
        "tensors": len(state),
        "parameters": sum(v.numel() for k, v in trunk.state_dict.items()),
        "global_step": trunk.global_step,
        "source": trunk.source,
        "block_chunks": model_config.block_chunks,
    }


# ------------------------------------------------------------------------------------------------
# start-up topology check


class TopologyError(RuntimeError):
    """The launched processes do not match ``trainer.devices`` x ``trainer.num_nodes``."""


@dataclass(frozen=True)
class Topology:
    world_size: int
    num_nodes: int
    devices_per_node: int
    global_rank: int
    local_rank: int
    node_rank: int
    cluster: str  # Lightning's cluster environment class (LightningEnvironment, SLURMEnvironment, ...)
    strategy: str

    def describe(self) -> str:
        return (
            f"topology: world size {self.world_size} = {self.num_nodes} node(s) x {self.devices_per_node} device(s); "
            f"strategy {self.strategy}; launcher {self.cluster}"
        )


def _leading_int(value: str) -> int:
    """SLURM writes per-node counts like ``4`` or ``4(x2)``."""
    digits = ""
    for ch in value:
        if not ch.isdigit():
            break
        digits += ch
    return int(digits) if digits else -1


def topology_problems(topo: Topology, configured_devices: int | None, env: Mapping[str, str]) -> list[str]:
    """Every way the running processes disagree with the config or the launcher (empty: fine).

    A SLURM job whose ``--ntasks-per-node`` is below ``trainer.devices`` would otherwise train on
    fewer GPUs than configured without a word (Lightning issue #20391).
    """
    problems = []
    expected = topo.devices_per_node * topo.num_nodes
    if topo.world_size != expected:
        problems.append(f"world size is {topo.world_size} but devices x num_nodes = {topo.devices_per_node} x {topo.num_nodes} = {expected}")
    if configured_devices is not None and configured_devices > 0 and configured_devices != topo.devices_per_node:
        problems.append(f"trainer.devices={configured_devices} but the trainer runs {topo.devices_per_node} device(s) per node")
    if topo.cluster == "SLURMEnvironment" and env.get("SLURM_JOB_NAME") not in ("bash", "interactive"):
        checks = (("SLURM_NTASKS", expected, "--ntasks (nodes x --ntasks-per-node)"),
                  ("SLURM_NTASKS_PER_NODE", topo.devices_per_node, "--ntasks-per-node"),
                  ("SLURM_NNODES", topo.num_nodes, "--nodes"))
        for var, want, flag in checks:
            if var in env and _leading_int(env[var]) != want:
                problems.append(f"SLURM {flag} gives {var}={env[var]} but the trainer expects {want}")
    if topo.cluster == "TorchElasticEnvironment":
        for var, want in (("WORLD_SIZE", expected), ("LOCAL_WORLD_SIZE", topo.devices_per_node)):
            if var in env and int(env[var]) != want:
                problems.append(f"torchrun set {var}={env[var]} but the trainer expects {want}")
    return problems


def current_topology(trainer: pl.Trainer) -> Topology:
    env = trainer.strategy.cluster_environment if hasattr(trainer.strategy, "cluster_environment") else None
    return Topology(
        world_size=int(trainer.world_size),
        num_nodes=int(trainer.num_nodes),
        devices_per_node=int(trainer.num_devices),
        global_rank=int(trainer.global_rank),
        local_rank=int(trainer.local_rank),
        node_rank=int(trainer.node_rank),
        cluster=type(env).__name__ if env is not None else "none",
        strategy=type(trainer.strategy).__name__,
    )


class TopologyCheck(pl.Callback):
    """At setup (process group up, before any collective of the run): raise :class:`TopologyError`
    on every rank if the launch does not match the config; rank 0 logs the topology."""

    def __init__(self, configured_devices: int | None = None) -> None:
        self.configured_devices = configured_devices
        self.topology: Topology | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        topo = current_topology(trainer)
        problems = topology_problems(topo, self.configured_devices, os.environ)
        if problems:
            raise TopologyError(
                f"rank {topo.global_rank}: the launch does not match the config: " + "; ".join(problems)
                + ". Launch one process per device: srun --nodes=<trainer.num_nodes> --ntasks-per-node=<trainer.devices>, "
                "or torchrun --nnodes=<trainer.num_nodes> --nproc_per_node=<trainer.devices>."
            )
        self.topology = topo
        rank_zero_info(topo.describe())


__all__ = [
    "TrunkCheckpoint",
    "Topology",
    "TopologyCheck",
    "TopologyError",
    "clip_fsdp1_gradients",
    "compile_blocks",
    "configure_editor_model",
    "current_topology",
    "export_trunk",
    "frozen_modules",
    "is_checkpoint",
    "is_sharded_checkpoint",
    "fsdp2_strategy",
    "fsdp_strategy",
    "load_trunk_checkpoint",
    "prepare_for_fsdp1",
    "resolve_devices",
    "saves_sharded_checkpoints",
    "shard_trunk",
    "topology_problems",
    "trunk_model_config",
    "verify_loadable",
]
