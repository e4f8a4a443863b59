"""Speed of the editing transformer per conditioning strategy, in one process (issues #3 and #9).

For fixed configs (M and L, or a tiny one with ``--quick``) and every strategy, interleaved so that
machine noise hits all of them alike:

* the fp32 2048^3 matmul time of this process (the *matmul unit*, comparable across machines),
  measured again in every round; every time is also reported as the median over rounds of
  ``time / matmul time of that round``;
* the teacher-forced train step (forward + bitwise loss + backward, no optimizer) and tokens/s;
* a cached edit (B = 1, CFG 4, tau 0.5, no VAE/T5) and the same edit with full recomputation
  (no KV cache: every scale re-runs the whole prefix);
* sequence lengths, visible attention pairs, useful model FLOPs and MFU (model FLOPs per second /
  the same process's matmul FLOP rate; see ``varedit_lab.model.flops``);
* ratios against the reference implementation's numbers and the targets of the issues;
* the probe overhead (``benchmarks/probe_overhead.py``).

    python benchmarks/run.py [--quick] [--out FILE] [--configs M L] [--repeats N]

Prints a table on stderr and the JSON on stdout (or to ``--out``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # runnable as a script from a checkout
    sys.path.insert(0, str(REPO))

import conditioning  # noqa: E402
from conditioning.base import ConditioningPlan  # noqa: E402
from varedit_lab.model.flops import edit_flops, forward_flops, recompute_edit_flops, train_step_flops, visible_pairs  # noqa: E402
from varedit_lab.model.layout import ScaleSchedule  # noqa: E402
from varedit_lab.model.loss import bitwise_loss  # noqa: E402
from varedit_lab.model.transformer import TextFeatures, TransformerConfig, VAREditTransformer  # noqa: E402

MATMUL_N = 2048
MATMUL_FLOPS = 2.0 * MATMUL_N**3
STRATEGIES = ("full_scale", "max_scale", "sar")
REFERENCE_PAD = 128  # the release pads every training sequence to a multiple of this

# The reference implementation on a 2-core CPU like ours (fp32, 2 threads, batch 2, 256 px).
REFERENCE = {
    "M": {
        "train_units": {"sar": 4.85, "max_scale": 5.02},
        "train_mfu": 0.538,
        "edit_units": {"sar": 1.75, "max_scale": 1.69},
    },
    "L": {"train_units": {"sar": 14.6}, "train_mfu": 0.627},
    "paper_edit_seconds_256px": {"full_scale": 0.8, "max_scale": 0.5, "sar": 0.5},
    "paper_sequence_length_256px": {"full_scale": 1042, "max_scale": 777, "sar": 777},
}
TARGETS = {
    "train_speedup_vs_reference_M": 1.25,  # >=
    "train_mfu_L": 0.70,  # >=
    "sar_over_max_train_time": 1.0,  # <=
    "edit_cache_speedup": 3.0,  # >=
    "edit_units_M": 1.4,  # <=
}


@dataclass(frozen=True)
class BenchConfig:
    name: str
    depth: int
    width: int
    num_heads: int
    text_channels: int
    text_len: int
    scales: tuple[int, ...]
    batch: int = 2
    codebook_dim: int = 32  # the 2B tokenizer: 32 bits per token, no patchify
    rope_layout: str = "paper"  # one layout for all strategies (full_scale needs paper)
    mlp_ratio: int = 4

    def transformer(self) -> TransformerConfig:
        return TransformerConfig(
            depth=self.depth,
            width=self.width,
            num_heads=self.num_heads,
            mlp_hidden=self.mlp_ratio * self.width,
            text_channels=self.text_channels,
            text_maxlen=max(64, self.text_len),
            codebook_dim=self.codebook_dim,
        )


SCALES_256 = (1, 2, 4, 6, 8, 12, 16)
CONFIGS = {
    "M": BenchConfig("M", depth=4, width=256, num_heads=4, text_channels=256, text_len=16, scales=SCALES_256),
    "L": BenchConfig("L", depth=4, width=512, num_heads=8, text_channels=256, text_len=16, scales=SCALES_256),
    "quick": BenchConfig("quick", depth=2, width=64, num_heads=2, text_channels=32, text_len=4, scales=(1, 2, 4)),
}


@dataclass
class Case:
    """One strategy on one config: its plan and data."""

    strategy: str
    plan: ConditioningPlan
    teacher: torch.Tensor
    bits: torch.Tensor
    edit_plan: ConditioningPlan
    times: dict[str, list[float]] = field(default_factory=dict)
    units: dict[str, list[float]] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------
# timing primitives
# Wall time by default. ``--clock cpu`` (one thread only) uses the main thread's CPU time instead:
# on a shared machine it counts the work done rather than the time waited for a core.
CLOCK: Callable[[], float] = time.perf_counter


def matmul_seconds(a: torch.Tensor, b: torch.Tensor, samples: int = 3) -> float:
    """Median time of ``a @ b`` (fp32 2048^3)."""
    times = []
    for _ in range(samples):
        t = CLOCK()
        torch.mm(a, b)
        times.append(CLOCK() - t)
    return statistics.median(times)


def timed(fn: Callable[[], Any]) -> float:
    t = CLOCK()
    fn()
    return CLOCK() - t


def train_step(model: VAREditTransformer, case: Case, text: TextFeatures, schedule: ScaleSchedule) -> None:
    model.zero_grad(set_to_none=True)
    logits = model(case.plan, case.teacher, text)
    bitwise_loss(logits, case.bits, schedule).loss.backward()


def edit(model: VAREditTransformer, case: Case, text: TextFeatures, use_cache: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    model.generate(case.edit_plan, text, cfg=4.0, tau=0.5, generator=gen, use_cache=use_cache)


# ----------------------------------------------------------------------------------------------
def make_cases(bc: BenchConfig, strategies: list[str], schedule: ScaleSchedule) -> list[Case]:
    g = torch.Generator().manual_seed(0)
    h, w = schedule.finest
    cases = []
    for name in strategies:
        strategy = conditioning.build(name)
        latent = torch.randn(bc.batch, bc.codebook_dim, h, w, generator=g)
        plan = strategy.plan(latent, schedule, bc.rope_layout, patchify=False)
        teacher = torch.randn(bc.batch, schedule.total - schedule.sizes[0], bc.codebook_dim, generator=g)
        bits = torch.randint(0, 2, (bc.batch, schedule.total, bc.codebook_dim), generator=g, dtype=torch.uint8)
        edit_plan = ConditioningPlan(plan.layout, plan.source_tokens[:1])
        cases.append(Case(name, plan, teacher, bits, edit_plan))
    return cases


def sequence_info(case: Case, cfg: TransformerConfig) -> dict[str, Any]:
    layout = case.plan.layout
    pairs = [visible_pairs(layout, layer) for layer in range(cfg.depth)]
    padded = -(-layout.length // REFERENCE_PAD) * REFERENCE_PAD
    return {
        "length": layout.length,
        "source_tokens": layout.num_source_tokens,
        "target_tokens": layout.length - layout.num_source_tokens,
        "reference_padded_length": padded,
        "visible_pairs_per_layer": pairs,
        # Dense masked attention over the padded sequence vs the pairs actually visible.
        "reference_dense_pairs_over_visible": padded**2 / (sum(pairs) / len(pairs)),
    }


def bench_config(bc: BenchConfig, strategies: list[str], repeats: int, warmup: int, recompute_repeats: int, log) -> dict[str, Any]:
    torch.manual_seed(0)
    cfg = bc.transformer()
    model = VAREditTransformer(cfg)
    schedule = ScaleSchedule.from_scales(list(bc.scales))
    cases = make_cases(bc, strategies, schedule)
    rounds = measure(model, bc, schedule, cases, repeats, warmup, recompute_repeats, log)
    unit = statistics.median(rounds)
    results = {case.strategy: summarise(cfg, bc, case, unit, min(rounds)) for case in cases}
    return {
        "config": {**asdict(bc), "mlp_hidden": cfg.mlp_hidden, "attention": cfg.attention},
        "matmul": {"ms": unit * 1e3, "gflops": MATMUL_FLOPS / unit / 1e9, "rounds_ms": [round(1e3 * t, 2) for t in rounds]},
        "strategies": results,
        "comparisons": comparisons(bc.name, results),
    }


def measure(
    model: VAREditTransformer,
    bc: BenchConfig,
    schedule: ScaleSchedule,
    cases: list[Case],
    repeats: int,
    warmup: int,
    recompute_repeats: int,
    log: Callable[[str], None],
) -> list[float]:
    """Time every case's train step and edits, interleaved round by round; returns the matmul time
    of every round (each case's ``units`` divide by the matmul time of the same round)."""
    g = torch.Generator().manual_seed(1)
    text = TextFeatures(torch.randn(bc.batch, bc.text_len, bc.text_channels, generator=g), torch.full((bc.batch,), bc.text_len))
    text1 = TextFeatures(text.features[:1], text.lengths[:1])
    a, b = torch.randn(MATMUL_N, MATMUL_N, generator=g), torch.randn(MATMUL_N, MATMUL_N, generator=g)

    def train(case: Case) -> None:
        model.train()
        train_step(model, case, text, schedule)

    def cached(case: Case) -> None:
        model.eval()
        edit(model, case, text1, use_cache=True)

    def recompute(case: Case) -> None:
        model.eval()
        edit(model, case, text1, use_cache=False)

    kinds: list[tuple[str, Callable[[Case], None], int]] = [
        ("train", train, repeats),
        ("edit_cached", cached, repeats),
        ("edit_recompute", recompute, recompute_repeats),
    ]
    for _ in range(warmup):
        matmul_seconds(a, b, 1)
        for case in cases:
            for _, fn, _ in kinds:
                fn(case)
    matmul_rounds: list[float] = []
    for r in range(repeats):
        # Alternate the order of strategies each round so that drifts hit them alike.
        order = cases if r % 2 == 0 else cases[::-1]
        unit = matmul_seconds(a, b)
        matmul_rounds.append(unit)
        for case in order:
            for kind, fn, n in kinds:
                if r < n:
                    t = timed(lambda: fn(case))
                    case.times.setdefault(kind, []).append(t)
                    case.units.setdefault(kind, []).append(t / unit)
        log(f"  {bc.name} round {r + 1}/{repeats}: matmul {unit * 1e3:.1f} ms")
    model.zero_grad(set_to_none=True)
    return matmul_rounds


def summarise(cfg: TransformerConfig, bc: BenchConfig, case: Case, unit: float, best_unit: float) -> dict[str, Any]:
    """Medians, units, throughput, FLOPs and MFU of one case (``unit``, ``best_unit``: median and
    fastest matmul seconds)."""
    layout = case.plan.layout
    entry: dict[str, Any] = {"sequence": sequence_info(case, cfg)}
    for kind in case.times:
        entry[kind] = {
            "ms": 1e3 * statistics.median(case.times[kind]),
            "units": statistics.median(case.units[kind]),
            # Best case (fastest run / fastest matmul): on a shared machine load only adds time.
            "units_best": min(case.times[kind]) / best_unit,
            "samples_ms": [round(1e3 * t, 2) for t in case.times[kind]],
        }
    tr = entry["train"]
    train_flops = train_step_flops(cfg, layout, bc.text_len, bc.batch)
    seconds = tr["units"] * unit  # noise-robust: median of per-round ratios times the median unit
    tr["tokens_per_s"] = bc.batch * layout.length / seconds
    tr["target_tokens_per_s"] = bc.batch * (layout.length - layout.num_source_tokens) / seconds
    tr["model_gflop"] = train_flops / 1e9
    tr["mfu"] = train_flops / (tr["units"] * MATMUL_FLOPS)
    # The reference's own count also includes the source rows of the last layer, whose outputs
    # nothing reads; this reproduces its MFU definition for a like-for-like comparison.
    ref_flops = train_flops + 3 * bc.batch * _unused_last_layer_flops(cfg, case, bc.text_len)
    tr["mfu_reference_count"] = ref_flops / (tr["units"] * MATMUL_FLOPS)
    ec = entry["edit_cached"]
    ed_flops = edit_flops(cfg, layout, bc.text_len, guided=True)
    ec["model_gflop"] = ed_flops / 1e9
    ec["mfu"] = ed_flops / (ec["units"] * MATMUL_FLOPS)
    if "edit_recompute" in entry:
        rc = entry["edit_recompute"]
        rc_flops = recompute_edit_flops(cfg, layout, bc.text_len, guided=True)
        rc["model_gflop"] = rc_flops / 1e9
        rc["mfu"] = rc_flops / (rc["units"] * MATMUL_FLOPS)
        rc["speedup_of_cache"] = rc["units"] / ec["units"]
        # The most a cache can save when both run equally efficiently: the work ratio.
        rc["flop_ratio_to_cached"] = rc_flops / ed_flops
    entry["forward_gflop_per_sample"] = {k: v / 1e9 for k, v in forward_flops(cfg, layout, bc.text_len).as_dict().items()}
    return entry


def _unused_last_layer_flops(cfg: TransformerConfig, case: Case, text_len: int) -> float:
    """FLOPs of the last layer's source queries (computed by the reference, unused by the loss)."""
    layout = case.plan.layout
    n_src, c = layout.num_source_tokens, cfg.width
    last = cfg.depth - 1
    pairs = visible_pairs(layout, last) - visible_pairs(layout, last, query_from=n_src)
    macs = n_src * (2 * c * c + 2 * c * c + 2 * text_len * c + 2 * c * cfg.mlp_hidden) + 2 * pairs * c
    return 2.0 * macs


def comparisons(name: str, results: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    ref = REFERENCE.get(name, {})
    for strategy, units in ref.get("train_units", {}).items():
        if strategy in results:
            out[f"train_speedup_vs_reference_{strategy}"] = units / results[strategy]["train"]["units"]
    for strategy, units in ref.get("edit_units", {}).items():
        if strategy in results:
            out[f"edit_speedup_vs_reference_{strategy}"] = units / results[strategy]["edit_cached"]["units"]
    if "sar" in results and "max_scale" in results:
        out["sar_over_max_train_time"] = results["sar"]["train"]["units"] / results["max_scale"]["train"]["units"]
        out["sar_over_max_edit_time"] = results["sar"]["edit_cached"]["units"] / results["max_scale"]["edit_cached"]["units"]
    if "full_scale" in results and "max_scale" in results:
        full, mx = results["full_scale"], results["max_scale"]
        out["full_over_max"] = {
            "sequence_length": full["sequence"]["length"] / mx["sequence"]["length"],
            "train_time": full["train"]["units"] / mx["train"]["units"],
            "edit_time": full["edit_cached"]["units"] / mx["edit_cached"]["units"],
            "paper_edit_time": REFERENCE["paper_edit_seconds_256px"]["full_scale"] / REFERENCE["paper_edit_seconds_256px"]["max_scale"],
        }
    return out


def check_targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []

    def add(name: str, value: float, target: float, higher_is_better: bool) -> None:
        met = value >= target if higher_is_better else value <= target
        rows.append({"name": name, "value": value, "target": target, "op": ">=" if higher_is_better else "<=", "met": bool(met)})

    m = report["configs"].get("M")
    if m:
        s = m["strategies"]
        for strategy in ("sar", "max_scale"):
            key = f"train_speedup_vs_reference_{strategy}"
            if key in m["comparisons"]:
                add(f"M {key}", m["comparisons"][key], TARGETS["train_speedup_vs_reference_M"], True)
            if strategy in s:
                add(f"M edit_cached units {strategy}", s[strategy]["edit_cached"]["units"], TARGETS["edit_units_M"], False)
                if "edit_recompute" in s[strategy]:
                    add(f"M edit cache speedup {strategy}", s[strategy]["edit_recompute"]["speedup_of_cache"], TARGETS["edit_cache_speedup"], True)
        if "sar_over_max_train_time" in m["comparisons"]:
            add("M sar_over_max_train_time", m["comparisons"]["sar_over_max_train_time"], TARGETS["sar_over_max_train_time"], False)
    big = report["configs"].get("L")
    if big:
        for strategy, entry in big["strategies"].items():
            if strategy in ("sar", "max_scale"):
                add(f"L train mfu {strategy}", entry["train"]["mfu"], TARGETS["train_mfu_L"], True)
        if "sar_over_max_train_time" in big["comparisons"]:
            add("L sar_over_max_train_time", big["comparisons"]["sar_over_max_train_time"], TARGETS["sar_over_max_train_time"], False)
    return rows


def probe_overhead(quick: bool, threads: int, log) -> dict[str, Any] | None:
    """Run ``benchmarks/probe_overhead.py`` in this process (None if it is not there)."""
    path = Path(__file__).with_name("probe_overhead.py")
    if not path.exists():
        return None
    spec = importlib.util.spec_from_file_location("varedit_benchmarks_probe_overhead", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    argv = (["--quick"] if quick else ["--repeats", "16"]) + ["--threads", str(threads)]
    log("probe overhead ...")
    return module.run(module.parse_args(argv))


# ----------------------------------------------------------------------------------------------
def format_table(report: dict[str, Any]) -> str:
    head = ("config", "strategy", "seq", "train ms", "units", "best", "MFU", "tok/s", "edit ms", "units", "best", "MFU", "recompute ms", "units", "cache x", "work x")
    rows = [head]
    for cname, cres in report["configs"].items():
        for strategy, e in cres["strategies"].items():
            tr, ec, rc = e["train"], e["edit_cached"], e.get("edit_recompute")
            rows.append(
                (
                    cname,
                    strategy,
                    str(e["sequence"]["length"]),
                    f"{tr['ms']:.1f}",
                    f"{tr['units']:.2f}",
                    f"{tr['units_best']:.2f}",
                    f"{100 * tr['mfu']:.1f}%",
                    f"{tr['tokens_per_s']:.0f}",
                    f"{ec['ms']:.1f}",
                    f"{ec['units']:.2f}",
                    f"{ec['units_best']:.2f}",
                    f"{100 * ec['mfu']:.1f}%",
                    f"{rc['ms']:.1f}" if rc else "-",
                    f"{rc['units']:.2f}" if rc else "-",
                    f"{rc['speedup_of_cache']:.2f}" if rc else "-",
                    f"{rc['flop_ratio_to_cached']:.2f}" if rc else "-",
                )
            )
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    for cname, cres in report["configs"].items():
        lines.append(f"{cname}: matmul 2048^3 fp32 {cres['matmul']['ms']:.1f} ms ({cres['matmul']['gflops']:.0f} GFLOP/s)")
        comp = cres["comparisons"]
        for key, value in comp.items():
            if isinstance(value, dict):
                lines.append(f"{cname}: {key}: " + ", ".join(f"{k} {v:.2f}" for k, v in value.items()))
            else:
                lines.append(f"{cname}: {key}: {value:.3f}")
    if not report["meta"]["comparable_to_reference"]:
        lines.append("note: the reference's numbers are 2-thread wall-clock units; this run's settings differ")
    for row in report["targets"]:
        lines.append(f"target {row['name']}: {row['value']:.3f} {row['op']} {row['target']}  {'met' if row['met'] else 'MISSED'}")
    po = report.get("probe_overhead")
    if po:
        lines.append(f"probe overhead (detached, train step): {po['train_step']['overhead_pct']:+.2f} %")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> dict[str, Any]:
    global CLOCK
    torch.set_num_threads(args.threads)
    CLOCK = time.thread_time if args.clock == "cpu" else time.perf_counter
    log = (lambda msg: print(msg, file=sys.stderr, flush=True)) if not args.silent else (lambda msg: None)
    load_before = os.getloadavg()
    started = time.time()
    configs: dict[str, Any] = {}
    for name in args.configs:
        log(f"config {name} ...")
        configs[name] = bench_config(CONFIGS[name], args.strategies, args.repeats, args.warmup, args.recompute_repeats, log)
    report: dict[str, Any] = {
        "benchmark": "varedit_lab.benchmarks.run",
        "meta": {
            "quick": args.quick,
            "clock": args.clock,
            # The reference's units were measured with 2 threads (wall clock); other settings
            # change what a matmul unit is relative to the model's work.
            "comparable_to_reference": args.threads == 2 and args.clock == "wall",
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "python": platform.python_version(),
            "machine": platform.machine(),
            "cpu_count": os.cpu_count(),
            "repeats": args.repeats,
            "warmup": args.warmup,
            "recompute_repeats": args.recompute_repeats,
            "loadavg_before": load_before,
            "loadavg_after": os.getloadavg(),
            "seconds": time.time() - started,
        },
        "reference": REFERENCE,
        "configs": configs,
    }
    report["targets"] = check_targets(report)
    report["probe_overhead"] = None if args.no_probe else probe_overhead(args.quick, args.threads, log)
    return report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny config, one round (a smoke test; timings meaningless)")
    parser.add_argument("--configs", nargs="+", choices=sorted(CONFIGS), default=["M", "L"])
    parser.add_argument("--strategies", nargs="+", choices=STRATEGIES, default=list(STRATEGIES))
    parser.add_argument("--repeats", type=int, default=9, help="timed rounds (medians are reported)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--recompute-repeats", type=int, default=3, help="rounds that also time the no-cache edit")
    parser.add_argument("--threads", type=int, help="torch threads (default 2; 1 with --quick)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall", help="cpu: thread CPU time (needs --threads 1)")
    parser.add_argument("--no-probe", action="store_true", help="skip the probe-overhead benchmark")
    parser.add_argument("--silent", action="store_true", help="no progress or table on stderr")
    parser.add_argument("--out", type=Path, help="write the JSON here (default: stdout)")
    args = parser.parse_args(argv)
    if args.quick:
        args.configs, args.repeats, args.warmup, args.recompute_repeats = ["quick"], 1, 1, 1
    if args.threads is None:
        # One thread in the smoke test: tiny ops with two OpenMP threads on a busy machine wait
        # milliseconds at every barrier.
        args.threads = 1 if args.quick or args.clock == "cpu" else 2
    if args.clock == "cpu" and args.threads != 1:
        parser.error("--clock cpu measures the main thread only: use it with --threads 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report = run(args)
    if not args.silent:
        print(format_table(report), file=sys.stderr)
    text = json.dumps(report, indent=1)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
