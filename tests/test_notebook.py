"""notebooks/attention_diagnostics.ipynb: committed without outputs, in sync with its generator, and
executed headless with nbclient (tiny settings injected after its parameters cell)."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import nbformat
import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "attention_diagnostics.ipynb"
GENERATOR = REPO / "notebooks" / "make_attention_diagnostics.py"
STRATEGIES = ["full_scale", "max_scale", "sar"]


def read_notebook() -> nbformat.NotebookNode:
    return nbformat.read(NOTEBOOK, as_version=4)


def test_notebook_is_committed_without_outputs():
    nb = read_notebook()
    nbformat.validate(nb)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert code and all(cell.outputs == [] and cell.execution_count is None for cell in code)
    assert NOTEBOOK.stat().st_size < 50_000  # no embedded images or data
    assert nb.metadata.kernelspec.name == "python3"


def test_notebook_matches_its_generator():
    spec = importlib.util.spec_from_file_location("make_attention_diagnostics", GENERATOR)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert NOTEBOOK.read_text() == module.render(), "regenerate: .venv/bin/python notebooks/make_attention_diagnostics.py"


def inject_parameters(nb: nbformat.NotebookNode, values: dict) -> None:
    """Insert a cell overriding parameters right after the cell tagged ``parameters`` (papermill-style)."""
    index = next(i for i, cell in enumerate(nb.cells) if "parameters" in cell.metadata.get("tags", []))
    source = "\n".join(f"{key} = {value!r}" for key, value in values.items())
    nb.cells.insert(index + 1, nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]}))


def use_this_python_kernel(prefix: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ``python3`` resolve to a kernelspec that starts ``sys.executable`` (this venv), whatever
    user- or system-level kernelspecs exist: JUPYTER_PATH is searched first."""
    from ipykernel.kernelspec import install

    install(prefix=str(prefix), kernel_name="python3")  # argv: [sys.executable, "-m", "ipykernel_launcher", ...]
    monkeypatch.setenv("JUPYTER_PATH", str(prefix / "share" / "jupyter"))


@pytest.mark.slow
def test_notebook_executes_headless(tmp_path, monkeypatch):
    from nbclient import NotebookClient

    use_this_python_kernel(tmp_path / "kernel", monkeypatch)

    nb = read_notebook()
    inject_parameters(nb, {
        "CHECKPOINTS": None, "WORK_DIR": str(tmp_path / "work"), "TRAIN_SAMPLES": 128, "TOKENIZER_STEPS": 4,
        "EDITOR_STEPS": 6, "BATCH_SIZE": 4, "DEPTH": 3, "WIDTH": 32, "PROBE_SAMPLES": 4,
    })
    NotebookClient(nb, kernel_name="python3", timeout=600, resources={"metadata": {"path": str(REPO)}}).execute()

    def text(cell) -> str:
        return "".join(out.get("text", "") for out in cell.get("outputs", []) if out.output_type == "stream")

    outputs = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs]
    assert not [out for out in outputs if out.output_type == "error"]
    find = next(cell for cell in nb.cells if "def sweep_checkpoints(" in cell.source)
    # no demo runs: how long it will train, said before it trains (4 + 3 x 6 steps), and the faster way
    assert "training here: a tokenizer (4 steps) and 3 editors (6 steps each)" in text(find)
    assert "about 0-1 min" in text(find) and "make demo DEMO=quick" in text(find)
    setup = next(cell for cell in nb.cells if "def show(" in cell.source)
    assert f"prefix {sys.prefix})" in text(setup)  # the kernel ran in the test's environment
    # 3 strategies x (block mass, locality, maps) + the comparison
    images = [out for out in outputs if "image/png" in out.get("data", {})]
    assert len(images) == 3 * 3 + 1
    summary_line = next(line for cell in nb.cells for line in text(cell).splitlines() if line.startswith("NOTEBOOK_SUMMARY "))
    summary = json.loads(summary_line.removeprefix("NOTEBOOK_SUMMARY "))
    assert sorted(summary) == STRATEGIES
    for strategy in STRATEGIES:
        assert summary[strategy]["layers"] == [0, 1, 2]
        for key in ("first", "last"):
            stats = summary[strategy][key]
            assert 0 < stats["source_mass"] < 1 and 0 < stats["norm_entropy"] <= 1 + 1e-6
        assert math.isfinite(summary[strategy]["last"]["locality"])
    # structural: SAR's layer 0 sees only its own pooled reference of the source, never the source itself
    assert summary["sar"]["first"]["same_scale_share"] == pytest.approx(1.0)
    assert summary["sar"]["first"]["locality"] is None
    work = tmp_path / "work"
    for strategy in STRATEGIES:
        probe_dir = work / "probes" / strategy
        assert sorted(p.name for p in probe_dir.iterdir()) == ["alignment.md", "alignment.png", "attention_maps.png", "block_mass.png",
                                                              "locality.png", "probe.json"]
        assert json.loads((probe_dir / "probe.json").read_text())["strategy"]["name"] == strategy
        assert (work / "runs" / f"{strategy}-s0" / "checkpoints" / "last.ckpt").is_file()
    assert (work / "tokenizer" / "tokenizer.pt").is_file() and (work / "strategy_comparison.png").is_file()


@pytest.mark.slow
def test_a_temporary_work_dir_is_removed_when_the_kernel_stops(tmp_path, monkeypatch):
    """WORK_DIR=None: the setup cell's temporary folder does not outlive the kernel."""
    from nbclient import NotebookClient

    use_this_python_kernel(tmp_path / "kernel", monkeypatch)
    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setenv("TMPDIR", str(temp))  # the kernel's tempfile.gettempdir()
    nb = read_notebook()
    setup = next(i for i, cell in enumerate(nb.cells) if "def show(" in cell.source)
    nb.cells = nb.cells[: setup + 1]  # parameters (WORK_DIR = None) and setup only
    NotebookClient(nb, kernel_name="python3", timeout=300, resources={"metadata": {"path": str(REPO)}}).execute()
    printed = "".join(out.get("text", "") for out in nb.cells[setup].outputs if out.output_type == "stream")
    assert f"work dir: {temp}/attention-diagnostics-" in printed and "removed when the kernel stops" in printed
    assert list(temp.glob("attention-diagnostics-*")) == []  # execute() shut the kernel down: the folder is gone
