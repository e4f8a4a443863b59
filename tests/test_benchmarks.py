"""The benchmark script runs end to end in --quick mode and writes the documented JSON (no timing asserts)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import REPO

STRATEGIES = {"full_scale", "max_scale", "sar"}


def test_quick_benchmark_json_schema(tmp_path):
    out = tmp_path / "bench.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "run.py"), "--quick", "--out", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "MFU" in proc.stderr  # the table
    report = json.loads(out.read_text())
    assert report["meta"]["quick"] is True and report["meta"]["threads"] == 1
    cfg = report["configs"]["quick"]
    assert cfg["matmul"]["ms"] > 0 and cfg["matmul"]["gflops"] > 0
    assert set(cfg["strategies"]) == STRATEGIES
    for entry in cfg["strategies"].values():
        seq = entry["sequence"]
        assert seq["length"] == seq["source_tokens"] + seq["target_tokens"]
        assert len(seq["visible_pairs_per_layer"]) == cfg["config"]["depth"]
        for kind in ("train", "edit_cached", "edit_recompute"):
            assert entry[kind]["ms"] > 0 and entry[kind]["units"] > 0
        train = entry["train"]
        assert train["tokens_per_s"] > 0 and train["model_gflop"] > 0 and 0 < train["mfu"]
        assert entry["edit_recompute"]["speedup_of_cache"] > 0
        assert entry["edit_recompute"]["flop_ratio_to_cached"] > 1  # no cache: more work
        assert entry["edit_cached"]["mfu"] > 0 and entry["edit_recompute"]["mfu"] > 0
        assert entry["forward_gflop_per_sample"]["total"] > 0
    lengths = {k: v["sequence"]["length"] for k, v in cfg["strategies"].items()}
    assert lengths == {"full_scale": 2 * 21, "max_scale": 16 + 21, "sar": 16 + 21}  # scales 1, 2, 4
    comp = cfg["comparisons"]
    assert comp["sar_over_max_train_time"] > 0 and comp["full_over_max"]["sequence_length"] > 1
    assert isinstance(report["targets"], list)
    probe = report["probe_overhead"]
    assert probe is None or "train_step" in probe
