"""Checks of issue 17 on CPU: the memory plan against measured peaks, and the host memory of loading.

1. ``varedit_lab.memplan`` against real CPU training steps (transformer + bitwise loss + backward +
   AdamW, random inputs) of two configs: ``tiny`` (tests/configs/tiny_editor.yaml, batch 16) and
   ``M`` (depth 4, width 256, 256-px-equivalent schedule, 777 tokens, batch 2), with and without
   activation checkpointing. The measurement is the peak of live tensor storage
   (:class:`varedit_lab.memplan.LiveTensorPeak`: every storage an op creates, until it is freed).
2. Lean loading: a reduced-depth checkpoint of the 2B width (width 2048, 16 heads, 2048-wide text,
   ``--depth`` blocks) written in the released key layout, then loaded by ``load_released`` into a
   meta-built model in a fresh process; reports the peak RSS increase (``ru_maxrss``) over the RSS
   before loading, as a multiple of the file size.

    python benchmarks/memory_plan.py [--depth 2] [--out FILE]      # JSON on stdout or to FILE
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # runnable as a script from a checkout
    sys.path.insert(0, str(REPO))

from varedit_lab.config import load_config  # noqa: E402
from varedit_lab.memplan import measure_train_peak, model_shape, train_memory  # noqa: E402

TINY = str(REPO / "tests" / "configs" / "tiny_editor.yaml")
CONFIGS = {
    "tiny": ["data.batch_size=16"],
    "M": ["model.width=256", "model.depth=4", "model.num_heads=4", "model.scales=[1,2,4,6,8,12,16]", "data.image_size=128",
          "data.batch_size=2", "text.tiny_d_model=256", "text.tiny_d_ff=512"],
}
TOLERANCE = 0.15
TEXT_TOKENS = 16  # instruction length of the measured steps (and of the plan they are compared with)


def check_plan(name: str, overrides: list[str]) -> list[dict]:
    cfg = load_config(TINY, overrides)
    shape = model_shape(cfg)
    rows = []
    for checkpointing in (False, True):
        measured = measure_train_peak(cfg, cfg.data.batch_size, checkpointing, text_len=TEXT_TOKENS)["peak"]
        planned = train_memory(shape, cfg, cfg.data.batch_size, checkpointing, 1, TEXT_TOKENS)["trunk_peak"]
        rows.append({"config": name, "checkpointing": checkpointing, "batch": cfg.data.batch_size, "tokens": shape.length,
                     "measured_bytes": measured, "planned_bytes": planned, "relative_error": planned / measured - 1,
                     "within_tolerance": abs(planned / measured - 1) <= TOLERANCE})
    return rows


LOAD_SCRIPT = r"""
import json, resource, sys, torch
from varedit_lab.model.build import build_transformer
from varedit_lab.config import load_config
from varedit_lab.model.compat import load_released
import psutil
# Warm up the loading path on a tiny checkpoint first: one-time library initialisation is not loading.
small = load_config(None, ["model.preset=tiny", "model.text_channels=64"])
with torch.device("meta"):
    warm = build_transformer(small.model, 32, False)
load_released(warm, sys.argv[1] + ".warm")
del warm
cfg = load_config(None, sys.argv[2:])
before = psutil.Process().memory_info().rss
with torch.device("meta"):
    model = build_transformer(cfg.model, 32, False)
load_released(model, sys.argv[1])
total = float(sum(p.sum() for p in model.parameters()))  # touch every byte (no copy)
# VmHWM is this process image's own peak; ru_maxrss would also count the parent's RSS at fork (Linux keeps
# the larger of the two across exec), which inflates the figure when a big process (pytest) starts us.
try:
    peak = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:"))
except OSError:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"rss_before": before, "peak_rss": peak, "increase": peak - before, "checksum": total}))
"""

WRITE_SCRIPT = r"""
import sys, torch
from varedit_lab.config import load_config
from varedit_lab.model.build import build_transformer
from varedit_lab.model.compat import to_released
cfg = load_config(None, sys.argv[2:])
model = build_transformer(cfg.model, 32, False)
torch.save(to_released(model.state_dict(), 1), sys.argv[1])
small = load_config(None, ["model.preset=tiny", "model.text_channels=64"])
torch.save(build_transformer(small.model, 32, False).state_dict(), sys.argv[1] + ".warm")
"""


def model_overrides(depth: int, width: int, heads: int, text: int) -> list[str]:
    return ["model.preset=infinity_2b", f"model.depth={depth}", f"model.width={width}", f"model.num_heads={heads}",
            f"model.text_channels={text}"]


def lean_load(depth: int, width: int = 2048, heads: int = 16, text: int = 2048, folder: str | None = None) -> dict:
    """Write a released-layout checkpoint, load it in a fresh process; peak RSS increase / file size."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    overrides = model_overrides(depth, width, heads, text)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        path = Path(tmp) / "2B-512.pth"
        subprocess.run([sys.executable, "-c", WRITE_SCRIPT, str(path), *overrides], check=True, env=env)
        out = subprocess.run([sys.executable, "-c", LOAD_SCRIPT, str(path), *overrides], check=True, env=env,
                             capture_output=True, text=True)
        result = json.loads(out.stdout.strip().splitlines()[-1])
        size = path.stat().st_size
    return {"depth": depth, "width": width, "file_bytes": size, **result, "ratio": result["increase"] / size}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=int, default=2, help="blocks of the 2B-width checkpoint (default 2: ~0.75 GB)")
    parser.add_argument("--out", help="write the JSON here")
    args = parser.parse_args()
    report = {"plan_vs_measured": [row for name, ov in CONFIGS.items() for row in check_plan(name, ov)],
              "lean_load": lean_load(args.depth), "tolerance": TOLERANCE}
    text = json.dumps(report, indent=2)
    if args.out:
        Path(args.out).write_text(text)
    print(text)
    return 0 if all(r["within_tolerance"] for r in report["plan_vs_measured"]) and report["lean_load"]["ratio"] <= 1.3 else 1


if __name__ == "__main__":
    sys.exit(main())
