"""Multi-process training on CPU with gloo (issue #8): DDP and FSDP2 against one process, sharded
checkpoints, resume, export, per-rank data, the start-up topology check, the strategy objects.

Every multi-process run is ``tests/dist_worker.py`` (the real ``varedit_lab.training.train``) in a
subprocess of its own session, killed as a whole process group on timeout: Lightning's launcher
starts the other ranks itself, and ``strategy="ddp"`` must never run inside pytest (ecosystem §2.4).
One reference run of one process (global batch 4, 6 steps) is shared by the comparisons.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from varedit_lab.cli import main as cli
from varedit_lab.config import ConfigError, load_config
from varedit_lab.distributed import Topology, TopologyCheck, TopologyError, load_trunk_checkpoint, topology_problems

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "tests" / "configs" / "tiny_editor.yaml"
WORKER = REPO / "tests" / "dist_worker.py"
TIMEOUT_S = 300
# Deterministic runs: no text dropout (its randomness is drawn per rank), checkpoints every 2
# steps, no validation unless a test turns it on.
FIXED = ("model.cond_drop_rate=0", "trainer.checkpoint_every_n_steps=2", "trainer.val_every_n_steps=1000",
         "trainer.checkpoint_monitor=null", "data.val_shards=null")
NUM_SAMPLES = 16  # one epoch = 4 optimizer steps at global batch 4
TOL = 1e-5  # float32 reduction-order noise after 4-6 AdamW steps (observed ~3e-6)


def run_worker(out: Path, *overrides: str, data: str = "fixed", snapshots: str = "", wandb: str = "disabled") -> None:
    cmd = [sys.executable, str(WORKER), "--data", data, "--num-samples", str(NUM_SAMPLES), "--snapshots", snapshots, str(out), str(TINY),
           f"output_dir={out}", "name=run", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": wandb, "WANDB_SILENT": "true", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # rank 1 is a child of rank 0: kill the whole session
        log, _ = proc.communicate()
        pytest.fail(f"run timed out after {TIMEOUT_S} s (hang?):\n{log[-4000:]}")
    assert proc.returncode == 0, f"run failed ({proc.returncode}):\n{log[-6000:]}"


def records(out: Path, world: int) -> list[dict]:
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def shards(synthetic_shards) -> list[str]:
    return [f"data.train_shards={synthetic_shards['train']}"]


@pytest.fixture(scope="module")
def reference(shards, tmp_path_factory) -> Path:
    """One process, global batch 4, 6 steps (epoch = 4 steps); weights at steps 0, 4 and 6."""
    out = tmp_path_factory.mktemp("reference")
    run_worker(out, *shards, *FIXED, "data.batch_size=4", "trainer.max_steps=6", snapshots="4")
    moved = max_diff(weights(out / "start.pt"), weights(out / "final.pt"))
    assert moved > 1e-3, "the reference run must change the weights, or the comparisons prove nothing"
    return out


# ------------------------------------------------------------------------------------------------
# multi-process runs


@pytest.mark.slow
@pytest.mark.distributed
def test_ddp_two_processes_train_like_one_process(reference, shards, tmp_path):
    run_worker(tmp_path, *shards, *FIXED, "data.batch_size=2", "trainer.max_steps=6", "trainer=ddp_sim", "trainer.strategy=ddp")
    ranks = records(tmp_path, 2)
    assert [r["strategy"] for r in ranks] == ["DDPStrategy"] * 2 and ranks[0]["world_size"] == 2
    assert max_diff(weights(reference / "final.pt"), weights(tmp_path / "final.pt")) < TOL
    # the ranks' per-step batches are disjoint halves of the one-process batch, in an epoch
    ref_keys = records(reference, 1)[0]["keys"]
    for step in range(6):
        halves = [r["keys"][2 * step : 2 * step + 2] for r in ranks]
        assert not set(halves[0]) & set(halves[1])
        assert sorted(halves[0] + halves[1]) == sorted(ref_keys[4 * step : 4 * step + 4])
    epoch = [set(r["keys"][:8]) for r in ranks]
    assert not epoch[0] & epoch[1] and len(epoch[0] | epoch[1]) == NUM_SAMPLES


@pytest.mark.slow
@pytest.mark.distributed
def test_ddp_webdataset_disjoint_ranks_bf16_accumulation_and_one_wandb_run(synthetic_shards, shards, tmp_path):
    # The real EditDataModule (rank-split shards, resampled, 2 batches per epoch: 2 epoch ends),
    # an uneven validation list (5 samples: 3 + 2 and a padding row) validated twice with edits,
    # W&B offline; plus bf16-mixed, gradient accumulation and per-block activation checkpointing.
    # model.attention=masked: the blockwise CPU kernels reject autocast's mixed dtypes (reported).
    run_worker(tmp_path, *shards, f"data.val_shards={synthetic_shards['val']}", "data.val_samples=5", "data.batch_size=2",
               "data.batches_per_epoch=2", "sampling.num_val_edits=3", "trainer.val_every_n_steps=4", "trainer.max_steps=4",
               "trainer=ddp_sim", "trainer.strategy=ddp", "trainer.precision=bf16-mixed", "trainer.accumulate_grad_batches=2",
               "model.activation_checkpointing=true", "model.attention=masked", "logger.mode=offline", data="shards", wandb="offline")
    ranks = records(tmp_path, 2)
    keys = [r["keys"] for r in ranks]
    assert [len(k) for k in keys] == [4 * 2 * 2] * 2  # 4 steps x 2 micro-batches x 2 samples, on both ranks
    assert not set(keys[0]) & set(keys[1]), "the ranks read the same training samples"
    for rank, rank_keys in enumerate(keys):  # rank r owns shards r, r + 2, ... (12 samples per shard)
        assert {int(k.split("-")[1]) // 12 % 2 for k in rank_keys} == {rank}
    assert [r["validations"] for r in ranks] == [2, 2]
    assert all(r["precision"] == "bf16-mixed" and r["trunk_checkpointing"] and r["end_step"] == 4 for r in ranks)
    run = tmp_path / "run"
    assert len(list((run / "wandb").glob("offline-run-*"))) == 1, "exactly one W&B run (rank 0)"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 4
    assert torch.isfinite(torch.tensor(summary["metrics"]["train/loss"])) and "val/loss" in summary["metrics"]


@pytest.mark.slow
@pytest.mark.distributed
def test_fsdp2_sharded_checkpoint_resume_and_export(reference, synthetic_shards, shards, tmp_path):
    # FSDP2 on 2 processes, per-rank micro-batch 1 x accumulation 2 = global batch 4, activation
    # checkpointing, validation with edits on an uneven list (every rank must run the same forwards).
    run = [*shards, *FIXED, "data.batch_size=1", "trainer.accumulate_grad_batches=2", "model.activation_checkpointing=true",
           "trainer=fsdp2_sim", f"data.val_shards={synthetic_shards['val']}", "data.val_samples=5", "sampling.num_val_edits=3",
           "trainer.val_every_n_steps=4"]
    run_worker(tmp_path, *run, "trainer.max_steps=4")
    first = records(tmp_path, 2)
    assert all(r["strategy"] == "ModelParallelStrategy" and r["optimizer_param_types"] == ["DTensor"] for r in first)
    assert all(r["trunk_checkpointing"] and r["validations"] == 2 for r in first)
    assert first[0]["optimizer_params"] == first[0]["trunk_params"] - 1  # all but the frozen cfg_uncond (no text dropout)

    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert ckpt.is_dir() and (ckpt / ".metadata").is_file() and (ckpt / "meta.pt").is_file()
    assert len(list(ckpt.glob("*.distcp"))) == 2, "one shard file per rank"

    # export consolidates the shards; equal to the one-process run after the same 4 steps
    assert cli(["export", str(ckpt), str(tmp_path / "step4.pth")]) == 0
    exported = weights(tmp_path / "step4.pth")
    assert max_diff(weights(reference / "step4.pt"), exported) < TOL
    from varedit_lab.model.compat import load_state_dict_strict
    from varedit_lab.module import EditorModule

    model = EditorModule(load_config(tmp_path / "step4.config.yaml")).model
    load_state_dict_strict(model, exported)
    assert cli(["export", str(ckpt), str(tmp_path / "released.pth"), "--released-layout"]) == 0
    released = weights(tmp_path / "released.pth")
    assert any(k.startswith("block_chunks.0.module.1.") for k in released) and "blocks.0.ada_gss" not in released
    load_state_dict_strict(model, released)
    assert max_diff(exported, {k: v.detach() for k, v in model.state_dict().items()}) == 0

    # resume: the shards, optimizer state and step come back; training continues to step 6 and
    # matches the uninterrupted one-process run (the checkpoint is at an epoch end)
    (tmp_path / "final.pt").rename(tmp_path / "first_final.pt")
    run_worker(tmp_path, *run, "trainer.max_steps=6", "resume=auto")
    resumed = records(tmp_path, 2)
    assert all(r["start_step"] == 4 and r["end_step"] == 6 and r["restored_adam_steps"] == [4.0] for r in resumed)
    assert max_diff(exported, weights(tmp_path / "start.pt")) == 0
    assert max_diff(weights(reference / "final.pt"), weights(tmp_path / "final.pt")) < TOL
    trunk = load_trunk_checkpoint(ckpt)
    assert trunk.global_step == 6 and max_diff(trunk.state_dict, weights(tmp_path / "final.pt")) == 0


@pytest.mark.slow  # ~30 s: inductor compiles the blocks on CPU
def test_compiled_blocks_train_with_bf16_accumulation_and_checkpointing(shards, tmp_path):
    run_worker(tmp_path, *shards, *FIXED, "trainer.max_steps=2", "trainer.precision=bf16-mixed", "trainer.accumulate_grad_batches=2",
               "model.activation_checkpointing=true", "model.compile_blocks=true", "model.attention=masked")
    record = records(tmp_path, 1)[0]
    assert record["compiled_blocks"] == 2 and record["end_step"] == 2 and record["precision"] == "bf16-mixed"
    assert max_diff(weights(tmp_path / "start.pt"), weights(tmp_path / "final.pt")) > 0


# ------------------------------------------------------------------------------------------------
# no processes


def topo(world: int = 8, nodes: int = 2, devices: int = 4, cluster: str = "LightningEnvironment") -> Topology:
    return Topology(world, nodes, devices, 0, 0, 0, cluster, "DDPStrategy")


def test_topology_matches():
    assert topology_problems(topo(), 4, {}) == []
    slurm = {"SLURM_NTASKS": "8", "SLURM_NTASKS_PER_NODE": "4(x2)", "SLURM_NNODES": "2", "SLURM_JOB_NAME": "train"}
    assert topology_problems(topo(cluster="SLURMEnvironment"), 4, slurm) == []
    assert topology_problems(topo(cluster="TorchElasticEnvironment"), -1, {"WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4"}) == []


def test_topology_mismatches_are_named():
    assert "world size is 6" in topology_problems(topo(world=6), 4, {})[0]
    assert "trainer.devices=8" in topology_problems(topo(), 8, {})[0]
    slurm = {"SLURM_NTASKS": "4", "SLURM_NTASKS_PER_NODE": "2", "SLURM_NNODES": "2", "SLURM_JOB_NAME": "train"}
    problems = topology_problems(topo(cluster="SLURMEnvironment"), 4, slurm)
    assert len(problems) == 2 and "SLURM_NTASKS=4" in problems[0] and "--ntasks-per-node" in problems[1]
    # an interactive allocation (salloc + python) is not checked against the allocation
    assert topology_problems(topo(cluster="SLURMEnvironment"), 4, {**slurm, "SLURM_JOB_NAME": "bash"}) == []
    assert "WORLD_SIZE=16" in topology_problems(topo(cluster="TorchElasticEnvironment"), 4, {"WORLD_SIZE": "16"})[0]


def test_topology_check_raises_at_setup(monkeypatch):
    monkeypatch.setenv("SLURM_NTASKS", "4")
    monkeypatch.setenv("SLURM_JOB_NAME", "train")
    slurm_env = type("SLURMEnvironment", (), {})()
    trainer = SimpleNamespace(world_size=8, num_nodes=2, num_devices=4, global_rank=3, local_rank=1, node_rank=0,
                              strategy=SimpleNamespace(cluster_environment=slurm_env))
    with pytest.raises(TopologyError, match=r"rank 3: .*SLURM_NTASKS=4.*srun --nodes"):
        TopologyCheck(4).setup(trainer, None, "fit")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    check = TopologyCheck(4)
    check.setup(trainer, None, "fit")
    assert check.topology.world_size == 8 and "2 node(s) x 4 device(s)" in check.topology.describe()


def test_strategy_objects_from_config():
    from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

    from varedit_lab.model.blocks import CrossAttnBlock
    from varedit_lab.training import build_strategy

    cfg = load_config(TINY, ["trainer=fsdp", "trainer.devices=4", "trainer.num_nodes=2"])
    fsdp = build_strategy(cfg)
    assert isinstance(fsdp, FSDPStrategy) and fsdp._state_dict_type == "sharded" and fsdp.kwargs["use_orig_params"]
    assert fsdp.kwargs["auto_wrap_policy"]._module_classes == {CrossAttnBlock}
    assert fsdp._activation_checkpointing_kwargs["auto_wrap_policy"]._module_classes == {CrossAttnBlock}
    mp = fsdp.mixed_precision  # bf16 autocast with float32 parameters, buffers and reduction
    assert (mp.param_dtype, mp.reduce_dtype, mp.buffer_dtype) == (torch.float32,) * 3 and cfg.trainer.precision == "bf16-mixed"
    assert cfg.sampling.num_val_edits == 0 and cfg.model.activation_checkpointing
    no_ac = build_strategy(load_config(TINY, ["trainer=fsdp", "model.activation_checkpointing=false"]))
    assert not no_ac._activation_checkpointing_kwargs

    fsdp2 = build_strategy(load_config(TINY, ["trainer=fsdp2", "trainer.devices=4", "trainer.num_nodes=3"]))
    assert isinstance(fsdp2, ModelParallelStrategy) and (fsdp2._data_parallel_size, fsdp2._tensor_parallel_size) == (12, 1)
    assert build_strategy(load_config(TINY, ["trainer=ddp_sim"])) == "ddp_spawn"
    with pytest.raises(ConfigError, match="fsdp2"):
        load_config(TINY, ["trainer.strategy=deepspeed"])


def test_configure_model_compiles_blocks_in_place_and_is_idempotent():
    from varedit_lab.module import EditorModule

    module = EditorModule(load_config(TINY, ["model.compile_blocks=true"]))
    keys = list(module.state_dict())
    module.configure_model()  # no trainer: nothing to shard; compile (lazily: nothing traced yet)
    compiled = [b._compiled_call_impl for b in module.model.blocks]
    assert all(c is not None for c in compiled) and list(module.state_dict()) == keys
    module.configure_model()
    assert [b._compiled_call_impl for b in module.model.blocks] == compiled
    plain = EditorModule(load_config(TINY))
    plain.configure_model()
    assert all(b._compiled_call_impl is None for b in plain.model.blocks)


def test_fsdp1_frozen_parts_outside_blocks_checkpointed_once_and_clipping():
    from varedit_lab.distributed import clip_fsdp1_gradients, prepare_for_fsdp1
    from varedit_lab.module import EditorModule
    from varedit_lab.training import build_strategy

    cfg = load_config(TINY, ["trainer=fsdp", "trainer.accelerator=cpu"])
    module, strategy = EditorModule(cfg), build_strategy(cfg)
    strategy.parallel_devices = [torch.device("cpu")]
    prepare_for_fsdp1(module, strategy)
    assert [m is f for m, f in zip(strategy.kwargs["ignored_modules"], (module.tokenizer, module.text_encoder))] == [True, True]
    assert not module.model.cfg.activation_checkpointing  # Lightning's wrapper checkpoints each block
    prepare_for_fsdp1(module, strategy)
    assert len(strategy.kwargs["ignored_modules"]) == 2
    with pytest.raises(ValueError, match="num_val_edits"):
        prepare_for_fsdp1(EditorModule(load_config(TINY, ["trainer=fsdp", "sampling.num_val_edits=2"])), strategy)
    # norm clipping goes through the FSDP root (Lightning's plugin refuses it under FSDP1)
    calls: list[float] = []
    strategy.model = SimpleNamespace(clip_grad_norm_=calls.append)
    module._trainer = SimpleNamespace(strategy=strategy)
    assert clip_fsdp1_gradients(module, 5.0, "norm") and calls == [5.0]
    module._trainer = SimpleNamespace(strategy=build_strategy(load_config(TINY, ["trainer=fsdp2", "trainer.devices=2"])))
    assert not clip_fsdp1_gradients(module, 5.0, "norm") and calls == [5.0]


def test_export_reads_fsdp1_sharded_layout_and_rejects_others(tmp_path):
    """FSDPStrategy saves {"model": lightning state dict, "optimizer_0": ...} with DCP; written here
    by DCP in one process, the layout Lightning's FSDPStrategy produces (FSDP1 needs CUDA)."""
    import torch.distributed.checkpoint as dcp

    from varedit_lab.config import to_dict
    from varedit_lab.module import EditorModule

    cfg = load_config(TINY)
    module = EditorModule(cfg)
    module.configure_model()
    state = {k: v.detach().clone() for k, v in module.state_dict().items()}
    ckpt = tmp_path / "last.ckpt"
    dcp.save({"model": state, "optimizer_0": {"state": {"x": torch.zeros(2)}}}, checkpoint_id=ckpt, no_dist=True)
    torch.save({"global_step": 7, "varedit_config": to_dict(cfg)}, ckpt / "meta.pt")
    assert cli(["export", str(ckpt), str(tmp_path / "out.pth")]) == 0
    out = weights(tmp_path / "out.pth")
    expected = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
    assert max_diff(expected, out) == 0
    assert (tmp_path / "out.config.yaml").is_file()

    (tmp_path / "partial").mkdir()
    with pytest.raises(FileNotFoundError, match="sharded"):
        load_trunk_checkpoint(tmp_path / "partial")
    torch.save({"state_dict": {}}, tmp_path / "other.ckpt")
    assert cli(["export", str(tmp_path / "other.ckpt"), str(tmp_path / "x.pth")]) == 2


@pytest.mark.gpu
def test_gpu_fsdp_smoke(tmp_path):
    """The fsdp preset on a 2B-shaped model of depth 2 (one GPU): trains, checkpoints, exports."""
    out = tmp_path / "smoke.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_fsdp_smoke.py"), "--depth", "2", "--steps", "6",
                           "--batch", "4", "--work-dir", str(tmp_path), "--out", str(out)], cwd=REPO, timeout=900,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(out.read_text())
    checks = result["checks"]
    assert checks["strategy"] == "FSDPStrategy" and checks["fsdp1_units"] >= 3 and checks["checkpoint_wrappers"] == 2
    assert checks["precision"] == "bf16-mixed" and result["peak_memory_gib"] > 0 and result["export"]["global_step"] == 6
