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

Environment: ``FAKE_TRAIN_CRASH_SEEDS`` (default "13") and ``FAKE_TRAIN_CRASH_NAMES`` (run names):
runs that crash (exit 3 after a traceback-like message, with a "failed" summary.json);
``FAKE_TRAIN_SLEEP``: seconds to sleep before writing the summary (interrupt tests);
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
    return metrics


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
    print(f"done: val/balance={final['val/balance']:.4f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
