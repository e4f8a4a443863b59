"""Every command that opens a checkpoint refuses a pickle that would run code, and runs none of it.

The malicious files create a marker directory when unpickled with ``weights_only=False`` (checked
first, so the test cannot pass because the payload is inert). Each command must exit non-zero with
a message that says the file was refused, and the marker must not exist afterwards.
"""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from varedit_lab.checkpoint_io import UnsafeCheckpointError, check_sharded_checkpoint, load_weights
from varedit_lab.cli import main

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "tests" / "configs" / "tiny_editor.yaml"


class _MakeMarker:
    """Unpickling this calls ``os.mkdir(path)``: a stand-in for arbitrary code."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def _payload_works(blob: bytes, marker: Path) -> None:
    """The payload really executes under a plain unpickler (then clean up)."""
    torch.load(io.BytesIO(blob), weights_only=False)
    assert marker.is_dir()
    marker.rmdir()


def evil_checkpoint(path: Path, marker: Path, **extra) -> Path:
    """A Lightning-looking checkpoint whose unpickling creates ``marker``."""
    obj = {"state_dict": {}, "varedit_config": {}, "global_step": 3, "payload": _MakeMarker(marker), **extra}
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    _payload_works(buffer.getvalue(), marker)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buffer.getvalue())
    return path


def evil_sharded_checkpoint(directory: Path, marker: Path, where: str) -> Path:
    """A DCP directory (+ Lightning's meta.pt) with the payload in its metadata, in a non-tensor
    entry (which DCP itself loads with weights_only=False) or in meta.pt."""
    state = {"state_dict": {"model.word_embed.weight": torch.zeros(4, 2)}, "optimizer_0": {"param_groups": [{"lr": 0.1}]}}
    if where == "entry":
        state["optimizer_0"]["param_groups"][0]["lr"] = _MakeMarker(marker)
    dcp.save(state, checkpoint_id=str(directory), no_dist=True)
    meta = {"global_step": 3, "varedit_config": {}}
    if where == "meta":
        meta["payload"] = _MakeMarker(marker)
    torch.save(meta, directory / "meta.pt")
    if where == "metadata":
        (directory / ".metadata").write_bytes(pickle.dumps(_MakeMarker(marker)))
    return directory


def _refused(capsys: pytest.CaptureFixture, code: int, marker: Path) -> None:
    captured = capsys.readouterr()
    text = captured.err + captured.out
    assert code != 0, text
    assert "refused" in text, text
    assert not marker.exists(), "the payload ran"


@pytest.fixture
def marker(tmp_path: Path) -> Path:
    return tmp_path / "PWNED"


def test_load_weights_refuses_and_names_the_global(tmp_path: Path, marker: Path):
    path = evil_checkpoint(tmp_path / "evil.ckpt", marker)
    with pytest.raises(UnsafeCheckpointError, match=r"refused.*mkdir|mkdir.*refused|refused"):
        load_weights(path, "editor checkpoint")
    assert not marker.exists()


@pytest.mark.parametrize("where", ["metadata", "entry", "meta"])
def test_sharded_checkpoint_check_refuses_each_place(tmp_path: Path, marker: Path, where: str):
    directory = evil_sharded_checkpoint(tmp_path / "last.ckpt", marker, where)
    with pytest.raises(UnsafeCheckpointError, match="refused"):
        check_sharded_checkpoint(directory)
    assert not marker.exists()


def test_a_clean_sharded_checkpoint_passes(tmp_path: Path):
    directory = evil_sharded_checkpoint(tmp_path / "clean.ckpt", tmp_path / "unused", where="none")
    assert check_sharded_checkpoint(directory).state_dict_metadata


@pytest.mark.parametrize("command", ["edit", "eval", "probe", "export"])
def test_commands_taking_a_checkpoint_refuse_it(tmp_path: Path, marker: Path, capsys, command: str):
    ckpt = str(evil_checkpoint(tmp_path / "evil.ckpt", marker))
    image = tmp_path / "in.png"
    from PIL import Image

    Image.new("RGB", (32, 32), "white").save(image)
    argv = {
        "edit": ["edit", "--ckpt", ckpt, "--image", str(image), "--instruction", "x", "--out", str(tmp_path / "o.png")],
        "eval": ["eval", "--ckpt", ckpt, "--benchmark", "synthetic", "--data", str(tmp_path), "--out", str(tmp_path / "e"), "--no-wandb"],
        "probe": ["probe", "--ckpt", ckpt, "--data", str(tmp_path), "--out", str(tmp_path / "p")],
        "export": ["export", ckpt, str(tmp_path / "out.pth")],
    }[command]
    _refused(capsys, main(argv), marker)


@pytest.mark.parametrize("where", ["metadata", "entry", "meta"])
def test_export_refuses_a_malicious_sharded_checkpoint(tmp_path: Path, marker: Path, capsys, where: str):
    directory = evil_sharded_checkpoint(tmp_path / "last.ckpt", marker, where)
    _refused(capsys, main(["export", str(directory), str(tmp_path / "out.pth")]), marker)


def test_check_reference_refuses_and_checks_the_other_files(tmp_path: Path, marker: Path, capsys, fixture_files):
    evil = evil_checkpoint(tmp_path / "evil.pt", marker)
    code = main(["check-reference", str(evil), str(fixture_files[0])])
    out = capsys.readouterr().out
    assert code != 0 and "refused" in out and not marker.exists()
    assert "18/18 fields ok" in out  # the good fixture was still checked


def _train_argv(tmp_path: Path, *overrides: str) -> list[str]:
    return ["train", str(TINY), f"output_dir={tmp_path / 'runs'}", "name=victim", "data.train_shards=unused", *overrides]


def test_train_refuses_a_malicious_resume_file_and_leaves_the_folder_alone(tmp_path: Path, marker: Path, capsys):
    folder = tmp_path / "runs" / "victim"
    evil_checkpoint(folder / "checkpoints" / "last.ckpt", marker)
    (folder / "summary.json").write_text('{"status": "completed"}')
    before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    _refused(capsys, main(_train_argv(tmp_path, "resume=auto")), marker)
    after = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    assert after == before
    other = evil_checkpoint(tmp_path / "elsewhere.ckpt", marker)
    _refused(capsys, main(_train_argv(tmp_path, f"resume={other}")), marker)


def test_train_refuses_a_malicious_sharded_resume(tmp_path: Path, marker: Path, capsys):
    directory = evil_sharded_checkpoint(tmp_path / "runs" / "victim" / "checkpoints" / "last.ckpt", marker, "entry")
    _refused(capsys, main(_train_argv(tmp_path, f"resume={directory}")), marker)


@pytest.mark.parametrize("key", ["model.init_from", "tokenizer.checkpoint"])
def test_train_refuses_malicious_weights_to_start_from(tmp_path: Path, marker: Path, capsys, synthetic_shards, key: str):
    evil = evil_checkpoint(tmp_path / "evil.pth", marker)
    argv = ["train", str(TINY), f"output_dir={tmp_path / 'runs'}", f"data.train_shards={synthetic_shards['train']}", f"{key}={evil}"]
    _refused(capsys, main(argv), marker)


def test_precompute_refuses_a_malicious_tokenizer(tmp_path: Path, marker: Path, capsys, synthetic_shards):
    evil = evil_checkpoint(tmp_path / "evil.pt", marker)
    argv = ["data", "precompute", str(TINY), "--shards", synthetic_shards["val"], "--out", str(tmp_path / "pre"),
            f"tokenizer.checkpoint={evil}"]
    _refused(capsys, main(argv), marker)


@pytest.mark.parametrize("which", ["transformer", "vae"])
def test_released_folder_with_a_malicious_file_is_refused(tmp_path: Path, marker: Path, capsys, fixture_files, which: str):
    from tests.test_edit import _released_dir_from_fixture, fixture_shape_overrides
    from varedit_lab.parity import load_fixture

    fixture = load_fixture(next(p for p in fixture_files if "sar_256_d32" in p.name))
    folder = _released_dir_from_fixture(fixture, tmp_path / "released")
    evil_checkpoint(folder / ("2B-256.pth" if which == "transformer" else "infinity_vae_d32reg.pth"), marker)
    image = tmp_path / "in.png"
    from PIL import Image

    Image.new("RGB", (32, 32), "white").save(image)
    argv = ["edit", "--released", str(folder), "--image", str(image), "--instruction", "x", "--out", str(tmp_path / "o.png")]
    for item in fixture_shape_overrides(fixture):
        argv += ["--override", item]
    _refused(capsys, main(argv), marker)


def test_fixture_editor_refuses_a_malicious_fixture(tmp_path: Path, marker: Path, capsys):
    evil = evil_checkpoint(tmp_path / "evil.pt", marker)
    image = tmp_path / "in.png"
    from PIL import Image

    Image.new("RGB", (32, 32), "white").save(image)
    _refused(capsys, main(["edit", "--fixture", str(evil), "--image", str(image), "--out", str(tmp_path / "o.png")]), marker)
