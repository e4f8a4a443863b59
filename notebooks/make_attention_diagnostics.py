"""Write ``notebooks/attention_diagnostics.ipynb`` (no outputs) from the cells below.

The notebook is generated so that it stays reviewable as code and is committed without outputs:
edit the cells here, then run ``.venv/bin/python notebooks/make_attention_diagnostics.py``.
``tests/test_notebook.py`` checks that the committed notebook equals this script's output and
executes it headless with nbclient.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat

NOTEBOOK = Path(__file__).with_name("attention_diagnostics.ipynb")

INTRO = """\
# Attention diagnostics: full-scale vs max-scale vs SAR

The VAREdit paper (§3.2.2, Fig. 3; App. A.7, Figs. 16–17) motivates its Scale-Aligned Reference (SAR)
module with the self-attention maps of a model trained with **full-scale** conditioning:

* in **layer 1** a target scale attends broadly, "focusing heavily on the corresponding and all coarser
  source scales" (global layout);
* in **deeper layers** attention is local, with strong diagonals between source and target tokens
  (copying a spatial neighbourhood of the finest source).

Hence SAR: layer 1 attends to a pooled reference of the finest source at the target's own scale, every
later layer to the finest source only (as max-scale does). Fig. 17 shows SAR's layer 1 concentrating on
its own reference.

This notebook measures those statements with `varedit_lab.probes` on tiny models: it trains (or loads)
one editor per strategy, probes the attention of every layer on fixed validation samples
(teacher-forced, mean over heads and samples) and plots

1. block attention mass of layer 1 vs the last layer (query block × key block),
2. locality and diagonality vs depth,
3. the paper-style full attention maps,
4. a strategy comparison of layer 1 vs the last layer.

It runs top to bottom headless (`tests/test_notebook.py` executes it with tiny settings, about a minute).
With the defaults below it trains a small tokenizer and three editors on the CPU: each training step
takes 0.2–0.7 s on a 2-core machine depending on how busy it is, so count 5–15 minutes (fewer steps in
the next cell make it faster and the models weaker). With the demo's sweep present (`make demo`) it
loads those checkpoints instead and takes seconds. Layers are numbered from 0 in
the code: **layer 0 here is the paper's layer 1**.
"""

PARAMETERS = """\
# Parameters (papermill-style: a cell inserted after this one may override any of them).
CHECKPOINTS = "auto"   # "auto": the demo sweep's runs when present (runs/demo/*/sweep/runs), else train here;
                       # None: always train here; a path: a sweep folder (or its runs/) with one run per strategy
WORK_DIR = None        # data, tokenizer, runs and probe outputs (None: a temporary folder, removed when the kernel stops)
STRATEGIES = ["full_scale", "max_scale", "sar"]
TRAIN_SAMPLES = 1024   # synthetic edit pairs (32 px) when training here
TOKENIZER_STEPS = 150  # 0: an untrained (random) tokenizer, saved so that training and probing share it
EDITOR_STEPS = 120     # per strategy
BATCH_SIZE = 16
DEPTH, WIDTH = 4, 64   # the editors (2 heads)
PROBE_SAMPLES = 8      # fixed validation samples probed per model
RADIUS = 1.0           # locality radius, in finest-source tokens
SEED = 0
"""

SETUP = """\
import json
import logging
import math
import os
import sys
import tempfile
import time
import warnings
from io import BytesIO
from pathlib import Path

import torch
from IPython.display import Image, Markdown, display

from varedit_lab.config import experiments_dir, load_config
from varedit_lab.probes import plots
from varedit_lab.probes.compare import compare_strategies, summarize, summary_markdown
from varedit_lab.probes.run import probe_checkpoint, runs_by_strategy

REPO = experiments_dir().parent
os.environ.setdefault("WANDB_MODE", "disabled")
# Training chatter (device banners, "no validation" notices) would bury the results.
warnings.filterwarnings("ignore", message=".*(does not have many workers|LeafSpec|litlogger|val_dataloader|IProgress|across ranks is zero).*")
import lightning.pytorch  # noqa: E402,F401  (it sets its loggers to INFO on import: lower them after)

for name in ("lightning.pytorch", "lightning.fabric"):
    logging.getLogger(name).setLevel(logging.WARNING)
torch.manual_seed(SEED)
# WORK_DIR=None: a TemporaryDirectory, deleted when this object is (at the latest when the kernel stops).
scratch = None if WORK_DIR else tempfile.TemporaryDirectory(prefix="attention-diagnostics-")
work = Path(WORK_DIR) if WORK_DIR else Path(scratch.name)
work.mkdir(parents=True, exist_ok=True)
print(f"python: {sys.executable} (prefix {sys.prefix})")
print(f"work dir: {work}" + (" (temporary: removed when the kernel stops; set WORK_DIR to keep it)" if scratch else ""))


def show(fig) -> None:
    \"\"\"Display a probe figure (matplotlib's object API, no pyplot state) as a PNG.\"\"\"
    buffer = BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    display(Image(data=buffer.getvalue()))
"""

CHECKPOINTS_MD = """\
## 1. One checkpoint per strategy

`CHECKPOINTS = "auto"` reuses the demo's conditioning-ablation sweep (64 px, the demo's trained
tokenizer) when every strategy has a completed run there. Otherwise the next cells train here:

* **data**: the synthetic edit benchmark (`varedit_lab.data.synth`) at 32 px;
* **tokenizer**: a small BSQ tokenizer (stride 4, 8 bits, 8×8 tokens, scales 1-2-4-6-8), trained for
  `TOKENIZER_STEPS` steps. An untrained tokenizer would hand the editor random bit hashes of image
  patches; the trained one gives it codes that reconstruct the image (its validation PSNR is printed).
  Editor checkpoints do not store the frozen tokenizer, so it is always written to a file that the
  editors and the probes load;
* **editors**: `DEPTH` layers of width `WIDTH`, one per strategy, the same seed, data and steps, through
  `varedit_lab.training.train` (W&B disabled, no validation: the probes are the evaluation here).
"""

FIND = """\
def sweep_checkpoints(spec) -> dict[str, Path] | None:
    \"\"\"last.ckpt of one completed run per strategy from a sweep, or None when "auto" finds none.\"\"\"
    folders = sorted(REPO.glob("runs/demo/*/sweep/runs")) if spec == "auto" else [Path(spec), Path(spec) / "runs"]
    for folder in folders:
        if folder.is_dir():
            runs = runs_by_strategy(folder)
            if all(s in runs for s in STRATEGIES):
                return {s: runs[s] / "checkpoints" / "last.ckpt" for s in STRATEGIES}
    if spec != "auto":
        raise FileNotFoundError(f"CHECKPOINTS={spec}: no completed run of every strategy in {STRATEGIES}")
    return None


checkpoints = sweep_checkpoints(CHECKPOINTS) if CHECKPOINTS else None
probe_data = None  # None: each checkpoint's own validation shards
if checkpoints:
    print("loading:", json.dumps({k: str(v) for k, v in checkpoints.items()}, indent=1))
else:
    # 5-15 min for the defaults' 510 steps on a 2-core CPU (0.2-0.7 s per step, plus setup per run)
    steps = TOKENIZER_STEPS + len(STRATEGIES) * EDITOR_STEPS
    low, high = 5 * steps / 510, 15 * steps / 510
    print(f"training here: a tokenizer ({TOKENIZER_STEPS} steps) and {len(STRATEGIES)} editors ({EDITOR_STEPS} steps each),\\n"
          f"about {low:.0f}-{high:.0f} min on a 2-core CPU (progress lines below). For seconds instead, run\\n"
          "`make demo DEMO=quick` first: CHECKPOINTS='auto' then probes its sweep's runs.")
"""

TRAIN = """\
QUIET = ["logger.mode=disabled", "trainer.progress_bar=false", "trainer.checkpoint_monitor=null", f"seed={SEED}"]
TOKENIZER = ["tokenizer.codebook_dim=8", "tokenizer.patch_size=4", "tokenizer.base_ch=8", "tokenizer.encoder_ch_mult=[1,1,1]",
             "tokenizer.decoder_ch_mult=[1,1,1]", "tokenizer.norm_num_groups=4", "tokenizer.scales=[1,2,4,6,8]"]


def completed(run: Path) -> bool:
    summary = run / "summary.json"
    return summary.is_file() and json.loads(summary.read_text()).get("status") == "completed"


def prepare_data() -> Path:
    from varedit_lab.data.synth import write_synthetic_shards

    data = work / "data"
    if not (data / "synth.json").is_file():
        write_synthetic_shards(data, {"train": TRAIN_SAMPLES, "val": 32}, image_size=32, seed=SEED, samples_per_shard=128)
    return data


def train_tokenizer(data: Path) -> Path:
    from varedit_lab.training import build_task, train

    run = work / "tokenizer"
    if (run / "tokenizer.pt").is_file():
        return run / "tokenizer.pt"
    steps = max(TOKENIZER_STEPS, 1)
    cfg = load_config(experiments_dir() / "tokenizer" / "synthetic64.yaml", TOKENIZER + QUIET + [
        f"data.train_shards={data}/train-*.tar", f"data.val_shards={data}/val-*.tar", "data.image_size=32",
        f"data.batch_size={BATCH_SIZE}", "data.val_samples=32", f"trainer.max_steps={steps}", f"trainer.val_every_n_steps={steps}",
        f"trainer.checkpoint_every_n_steps={steps}", "optim.warmup_steps=20", "optim.lr=3e-3",
        f"output_dir={work}", "name=tokenizer"])
    if TOKENIZER_STEPS == 0:
        return build_task(cfg)[0].save(run / "tokenizer.pt")  # untrained, but one fixed tokenizer for all
    train(cfg)
    psnr = json.loads((run / "summary.json").read_text())["metrics"].get("val/psnr", math.nan)
    print(f"tokenizer: {TOKENIZER_STEPS} steps, validation PSNR {psnr:.1f} dB")
    return run / "tokenizer.pt"


def train_editor(strategy: str, data: Path, tokenizer: Path) -> Path:
    from varedit_lab.training import train

    run = work / "runs" / f"{strategy}-s{SEED}"
    if not completed(run):
        cfg = load_config(experiments_dir() / "synthetic" / "base.yaml", QUIET + [
            f"tokenizer.checkpoint={tokenizer}", "text.tiny_d_model=32", "text.tiny_d_ff=64", "text.tiny_num_heads=2",
            "text.tiny_num_layers=1", f"model.depth={DEPTH}", f"model.width={WIDTH}", "model.num_heads=2",
            "model.scales=[1,2,4,6,8]", f"conditioning.name={strategy}", f"data.train_shards={data}/train-*.tar",
            "data.val_shards=null", "data.image_size=32", f"data.batch_size={BATCH_SIZE}", f"trainer.max_steps={EDITOR_STEPS}",
            f"trainer.checkpoint_every_n_steps={EDITOR_STEPS}", "optim.warmup_steps=20", "optim.lr=2e-3",
            f"output_dir={work / 'runs'}", f"name={run.name}"])
        train(cfg)
    metrics = json.loads((run / "summary.json").read_text())["metrics"]
    print(f"{strategy}: {EDITOR_STEPS} steps, final train loss {metrics['train/loss']:.3f}, bit accuracy {metrics['train/bit_acc']:.3f}")
    return run / "checkpoints" / "last.ckpt"


if checkpoints is None:
    start = time.perf_counter()
    data = prepare_data()
    tokenizer = train_tokenizer(data)
    checkpoints = {s: train_editor(s, data, tokenizer) for s in STRATEGIES}
    probe_data = f"{data}/val-*.tar"
    print(f"trained in {time.perf_counter() - start:.0f} s")
"""

PROBE_MD = """\
## 2. Probe every layer

`probe_checkpoint` rebuilds each editor from its checkpoint, encodes the first `PROBE_SAMPLES`
validation samples and runs a teacher-forced forward in which every layer's attention is recomputed
eagerly from the same queries and keys as the fast kernel (so the statistics describe exactly what the
model computes). It writes `probe.json` and the standard PNGs per strategy. The table gives, per
strategy, layer 0 → last layer, means over the target scales 1..K-1 (the 1×1 SOS scale is left out):

* **source mass**: attention on source-derived keys (source tokens, SAR's pooled references);
* **same-scale share**: the part of it on the source block with the query's own grid (SAR's own
  reference in its layer 0);
* **locality**: the part of the finest-source mass within `RADIUS` tokens of the aligned position
  (in parentheses: its value under uniform attention); "–" where the finest source is invisible
  (SAR's layer 0);
* **diagonality**: lift of the mass on the aligned source tokens over uniform attention (1 = none);
* **entropy / max**: 1 = uniform over the visible keys, lower = peaked.
"""

PROBE = """\
results = {}
for strategy, ckpt in checkpoints.items():
    start = time.perf_counter()
    results[strategy] = probe_checkpoint(ckpt, data=probe_data, num_samples=PROBE_SAMPLES, radius=RADIUS, maps="all",
                                         out_dir=work / "probes" / strategy)
    print(f"{strategy}: probed layers {results[strategy].layers} in {time.perf_counter() - start:.1f} s")
display(Markdown(summary_markdown(results)))
"""

BLOCK_MD = """\
## 3. Block attention mass: layer 0 vs the last layer

Rows are query blocks (source blocks, the SOS scale and the target scales), columns the key blocks the
layer can see (SAR's layer 0 adds its pooled references `ref@HxW`); each cell is the mean attention mass
and every row sums to 1. The paper's claim in this picture: in layer 0 of the full-scale model the
target rows put their source mass on the source scales up to their own; deeper, on the finest source.
Zeros are masked blocks (causality across scales, and the strategy's visibility).
"""

BLOCK = """\
for strategy, result in results.items():
    show(plots.plot_block_mass(result, layers=[result.layers[0], result.layers[-1]]))
"""

LOCALITY_MD = """\
## 4. Locality and diagonality vs depth

One line per target scale; dashed lines are uniform attention. The paper's "deeper layers are local and
diagonal" reads as locality well above the dashed line and diagonality above 1 in the deeper layers.
"""

LOCALITY = """\
for strategy, result in results.items():
    show(plots.plot_locality(result))
"""

MAPS_MD = """\
## 5. The paper's figure: full attention maps

Mean over heads and samples of the whole-sequence attention of every layer (queries down, keys across,
block boundaries in white; the colour scale is clipped at the 99th percentile). Diagonal stripes in the
source columns of the target rows are the "local copying" of the paper; SAR's layer 0 has its
reference columns at the right ("ref | tgt" in Fig. 17).
"""

MAPS = """\
for strategy, result in results.items():
    show(plots.plot_attention_maps(result))
"""

COMPARE_MD = """\
## 6. Layer 0 vs the last layer, per strategy

Solid: layer 0; dashed: the last layer; one colour per strategy, per target scale.
"""

COMPARE = """\
show(compare_strategies(results, work / "strategy_comparison.png"))
for strategy, result in results.items():
    first, last = summarize(result)["first"], summarize(result)["last"]
    if math.isnan(first["locality"]):
        trend = "the finest source is invisible in layer 0"
    else:
        trend = f"layer 0 locality {first['locality']:.2f}: the last layer is {'more' if last['locality'] > first['locality'] else 'not more'} local"
    print(f"{strategy}: layer 0 puts {first['source_mass']:.2f} of its attention on the source "
          f"({first['same_scale_share']:.2f} of that on the same-grid block), the last layer {last['source_mass']:.2f}; "
          f"last-layer locality {last['locality']:.2f} (uniform {last['uniform_locality']:.2f}), "
          f"diagonality {last['diagonality']:.2f}; {trend}")
"""

CHECKS = """\
# Checks (the test reads the JSON line printed at the end).
summary = {}
for strategy, result in results.items():
    for layer in result.layers:
        mass = result.block_mass(layer)[result.query_blocks(layer)]
        assert torch.isfinite(mass).all() and torch.allclose(mass.sum(1), torch.ones(len(mass), dtype=mass.dtype), atol=1e-5)
    summary[strategy] = {"layers": result.layers, **{k: {m: (None if math.isnan(v) else v) for m, v in d.items()} for k, d in summarize(result).items()}}
    assert (work / "probes" / strategy / "probe.json").is_file()
print("NOTEBOOK_SUMMARY " + json.dumps(summary))
"""

SCALE_MD = """\
## What the numbers mean at this scale

* These are **tiny models** (4 layers of width 64, about 0.3 M parameters, and a 20 k-parameter
  tokenizer) trained for minutes on 32 px synthetic edits through 8 bits per token; the paper's maps come from a 2B-parameter,
  32-layer model trained on millions of real edit pairs at 256–512 px. Whether the layer-0-vs-deeper
  contrast appears here depends on how far training got: treat the plots as a measurement of these
  models, not as a reproduction of Fig. 3. The demo sweep's models (64 px, longer training) are the
  better subjects (`CHECKPOINTS = "auto"` after `make demo`).
* **Structural vs learned.** Some numbers are fixed by the masks: SAR's layer-0 same-scale share is 1
  (each target scale sees only its own reference, and the finest source is invisible there, hence no
  locality); full-scale's default `coarser` visibility lets scale k see source scales ≤ k only. What the
  model learns is how much attention goes to the source at all (vs the target history and SOS), how it
  splits between the visible source scales, and how local, diagonal and peaked it is.
* **Baselines.** Uniform attention gives diagonality 1, entropy / max 1 and the dashed locality values
  (about (2r+1)² / 64 on the 8×8 source for interior queries at radius r = 1). Statistics are means over
  heads and `PROBE_SAMPLES` samples; `probe.json` also stores them per head, with the spread over heads.
"""

CELLS: list[tuple[str, str, list[str]]] = [
    ("markdown", INTRO, []),
    ("code", PARAMETERS, ["parameters"]),
    ("code", SETUP, []),
    ("markdown", CHECKPOINTS_MD, []),
    ("code", FIND, []),
    ("code", TRAIN, []),
    ("markdown", PROBE_MD, []),
    ("code", PROBE, []),
    ("markdown", BLOCK_MD, []),
    ("code", BLOCK, []),
    ("markdown", LOCALITY_MD, []),
    ("code", LOCALITY, []),
    ("markdown", MAPS_MD, []),
    ("code", MAPS, []),
    ("markdown", COMPARE_MD, []),
    ("code", COMPARE, []),
    ("code", CHECKS, []),
    ("markdown", SCALE_MD, []),
]


def build() -> nbformat.NotebookNode:
    """The notebook, without outputs, with stable cell ids (reproducible bytes)."""
    nb = nbformat.v4.new_notebook()
    nb.metadata = {
        "kernelspec": {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"},
        "language_info": {"name": "python"},
    }
    for index, (kind, source, tags) in enumerate(CELLS):
        make = nbformat.v4.new_markdown_cell if kind == "markdown" else nbformat.v4.new_code_cell
        cell = make(source.rstrip("\n"))
        cell.id = f"cell-{index:02d}"
        if tags:
            cell.metadata["tags"] = tags
        nb.cells.append(cell)
    nbformat.validate(nb)
    return nb


def render() -> str:
    return nbformat.writes(build()) + "\n"


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else NOTEBOOK
    target.write_text(render())
    print(f"wrote {target}")
