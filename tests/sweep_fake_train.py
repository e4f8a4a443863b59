"""A stand-in for ``varedit-lab train`` in the sweep tests: the same argv, the same files, no model.

    python tests/sweep_fake_train.py train EXPERIMENT.yaml key=value ...

The arguments are merged onto the real config schema (``RunConfig``: unknown keys and wrong types
fail as in ``train``; ``--key=value`` is accepted as from W&B's ``${args}``). The conditioning
strategy check is left to the runner's preflight (full ``load_config``), which keeps this program
free of torch: about 0.3 s a run instead of 2 s. The run
directory ``{output_dir}/{name}`` gets ``config.yaml``, a CSVLogger-style ``metrics.csv`` (sparse
rows) and ``summary.json`` with metrics that are known functions of (strategy, seed, lr), so tests
can check the report's means and intervals by hand:

    val/balance = BALANCE[strategy] + 0.02 * seed - 0.1 * |log10(lr / 1e-3)|
    val/success = SUCCESS[strategy] + 0.01 * seed,   val/preservation = PRESERVATION[strategy] + 0.03 * seed
    val/loss = LOSS[strategy] - 0.01 * seed,         val/scale{k}_bit_acc = 0.9 - 0.1 k + 0.01 seed

and the training side's contract metrics (see varedit_lab.sweep.evidence), logged at every
validation (steps 1, 3, ..., the last one final; earlier values are higher by 0.01 per step left):

    val/ce_in/s{k} = 0.6 + CE_IN[strategy] + 0.01 seed - 0.05 k,   val/ce_out/s{k} = 0.3 + 0.01 seed - 0.02 k
    val/ce_in_coarse = 0.6 + CE_IN[strategy] + 0.01 seed + (0.02 seed for sar)   (sar - max: -0.04, -0.02, 0.00)
    val/ce_out_coarse, val/ce_{in,out}_fine, val/ce_{in,out}, val/bitacc_{in,out}/s{k}, val/copy_{success,...}

``samples.jsonl``: 8 samples (keys k0..k7, kinds recolour/add/remove/background in turn) with
``success = SUCCESS_DB[strategy] + 0.1 i + 0.2 seed``, ``copy_success = 6 + 0.1 i`` (the same for every
strategy), ``preservation = 20 + 0.5 i + PRESERVATION_DB[strategy]``, ``ce_in_coarse`` equal to the
run's value plus ``0.01 (i - 3.5)`` (same mean), and the remaining contract fields.

Environment: ``FAKE_TRAIN_CRASH_SEEDS`` (default "13") and ``FAKE_TRAIN_CRASH_NAMES`` (run names):
runs that crash (exit 3 after a traceback-like message, with a "failed" summary.json);
``FAKE_TRAIN_SLEEP``: seconds to sleep before writing the summary (interrupt tests);
``FAKE_TRAIN_CONTRACT=0``: neither the contract metrics nor samples.jsonl (runs as W&B holds them);
``FAKE_TRAIN_ROW_SLEEP``: write ``metrics.csv`` row by row, this many seconds apart, each row also
carrying the run's final ``val/balance`` (early-termination tests: a metric logged while running).
"""

from __future__ import annotations

import csv
import json
import math
import os
import sys
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from varedit_lab.config import save_config, to_dict
from varedit_lab.config.schema import RunConfig

SUCCESS = {"full_scale": 0.50, "max_scale": 0.55, "sar": 0.60}
PRESERVATION = {"full_scale": 0.70, "max_scale": 0.75, "sar": 0.80}
BALANCE = {"full_scale": 0.56, "max_scale": 0.59, "sar": 0.62}
LOSS = {"full_scale": 0.40, "max_scale": 0.38, "sar": 0.35}
SEQ_LEN = {"full_scale": 1042.0, "max_scale": 777.0, "sar": 777.0}
STEP_S = {"full_scale": 0.08, "max_scale": 0.05, "sar": 0.05}
CE_IN = {"full_scale": 0.05, "max_scale": 0.0, "sar": -0.04}
SUCCESS_DB = {"full_scale": 7.0, "max_scale": 8.0, "sar": 8.5}
PRESERVATION_DB = {"full_scale": -1.0, "max_scale": 0.0, "sar": 0.5}
KINDS = ("recolour", "add", "remove", "background")
NUM_SAMPLES = 8


def contract_metrics(strategy: str, seed: int, num_scales: int) -> dict[str, float]:
    """The per-scale mask-split and copy-baseline metrics at the last validation."""
    ce_in = 0.6 + CE_IN[strategy] + 0.01 * seed
    metrics = {
        "val/ce_in_coarse": ce_in + (0.02 * seed if strategy == "sar" else 0.0),
        "val/ce_out_coarse": 0.3 + 0.01 * seed,
        "val/ce_in_fine": ce_in - 0.1,
        "val/ce_out_fine": 0.25 + 0.01 * seed,
        "val/ce_in": ce_in - 0.05,
        "val/ce_out": 0.28 + 0.01 * seed,
        "val/copy_success": 6.35,
        "val/copy_preservation": 30.0,
        "val/copy_balance": 10.0,
    }
    for k in range(num_scales):
        metrics[f"val/ce_in/s{k}"] = ce_in - 0.05 * k
        metrics[f"val/ce_out/s{k}"] = 0.3 + 0.01 * seed - 0.02 * k
        metrics[f"val/bitacc_in/s{k}"] = 0.7 + 0.05 * k
        metrics[f"val/bitacc_out/s{k}"] = 0.9
    return metrics


def sample_rows(strategy: str, seed: int, ce_in_coarse: float) -> list[dict[str, object]]:
    rows = []
    for i in range(NUM_SAMPLES):
        success, preservation = SUCCESS_DB[strategy] + 0.1 * i + 0.2 * seed, 20 + 0.5 * i + PRESERVATION_DB[strategy]
        rows.append(
            {
                "key": f"k{i}",
                "kind": KINDS[i % len(KINDS)],
                "success": success,
                "preservation": preservation,
                "balance": 2 * success * preservation / (success + preservation),
                "copy_success": 6 + 0.1 * i,
                "copy_preservation": 30.0,
                "copy_balance": 10.0,
                "ce_in": ce_in_coarse - 0.05,
                "ce_out": 0.28,
                "ce_in_coarse": ce_in_coarse + 0.01 * (i - 3.5),
                "ce_out_coarse": 0.3,
            }
        )
    return rows


def final_metrics(strategy: str, seed: int, lr: float, num_scales: int) -> dict[str, float]:
    metrics = {
        "val/success": SUCCESS[strategy] + 0.01 * seed,
        "val/preservation": PRESERVATION[strategy] + 0.03 * seed,
        "val/balance": BALANCE[strategy] + 0.02 * seed - 0.1 * abs(math.log10(lr / 1e-3)),
        "val/loss": LOSS[strategy] - 0.01 * seed,
        "val/bit_acc": 0.8 + 0.01 * seed,
        "perf/train_step_s": STEP_S[strategy],
        "perf/seq_len": SEQ_LEN[strategy],
    }
    for k in range(num_scales):
        metrics[f"val/scale{k}_bit_acc"] = 0.9 - 0.1 * k + 0.01 * seed
    if os.environ.get("FAKE_TRAIN_CONTRACT", "1") == "0":  # a run as older code logged it (no contract metrics)
        return metrics
    return {**metrics, **contract_metrics(strategy, seed, num_scales)}


def write_metrics_csv(path: Path, steps: int, every: int, final: dict[str, float]) -> None:
    """Lightning CSVLogger layout: one header, sparse rows (train every ``every`` steps, val at the end)."""
    columns = ["epoch", "step", "train/loss", *sorted(final)]
    row_sleep = float(os.environ.get("FAKE_TRAIN_ROW_SLEEP", "0"))
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for step in range(0, steps, every):
            row = {"epoch": 0, "step": step, "train/loss": final["val/loss"] + 1.0 / (1 + step)}
            if row_sleep:
                row["val/balance"] = final["val/balance"]
                handle.flush()
                time.sleep(row_sleep)
            writer.writerow(row)
            if step + 1 < steps - 1:  # earlier validations of the contract metrics (a curve per metric)
                left = steps - 1 - step
                writer.writerow({"epoch": 0, "step": step + 1, **{k: v + 0.01 * left for k, v in final.items() if k.startswith("val/ce")}})
        writer.writerow({"epoch": 0, "step": steps - 1, **{k: v for k, v in final.items() if not k.startswith("perf/")}})


def resolve(experiment: str, overrides: list[str]) -> DictConfig:
    """Schema + experiment YAML + dotlist, as ``load_config`` merges them (no ``base:`` includes)."""
    dotlist = OmegaConf.from_dotlist([item.lstrip("-") for item in overrides])
    return OmegaConf.merge(OmegaConf.structured(RunConfig), OmegaConf.load(experiment), dotlist)  # type: ignore[return-value]


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[0] != "train":
        print("usage: sweep_fake_train.py train EXPERIMENT.yaml key=value ...", file=sys.stderr)
        return 2
    cfg = resolve(argv[1], argv[2:])
    run_dir = Path(cfg.output_dir) / str(cfg.name)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    print(f"fake training {cfg.name}: strategy={cfg.conditioning.name} seed={cfg.seed} lr={cfg.optim.lr}", flush=True)
    crash_seeds = {int(s) for s in os.environ.get("FAKE_TRAIN_CRASH_SEEDS", "13").split(",") if s.strip()}
    crash_names = set(filter(None, os.environ.get("FAKE_TRAIN_CRASH_NAMES", "").split(",")))
    if cfg.seed in crash_seeds or cfg.name in crash_names:
        summary = {"status": "failed", "error": "RuntimeError: fake crash"}
        (run_dir / "summary.json").write_text(json.dumps(summary))
        print("Traceback (most recent call last):\nRuntimeError: fake crash for seed", cfg.seed, file=sys.stderr)
        return 3
    time.sleep(float(os.environ.get("FAKE_TRAIN_SLEEP", "0")))
    final = final_metrics(cfg.conditioning.name, cfg.seed, cfg.optim.lr, len(cfg.model.scales))
    write_metrics_csv(run_dir / "metrics.csv", cfg.trainer.max_steps, cfg.trainer.log_every_n_steps, final)
    summary = {"status": "completed", "steps": cfg.trainer.max_steps, "metrics": final, "config": to_dict(cfg)}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    if "val/ce_in_coarse" in final:
        rows = sample_rows(cfg.conditioning.name, cfg.seed, final["val/ce_in_coarse"])
        (run_dir / "samples.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    print(f"done: val/balance={final['val/balance']:.4f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
