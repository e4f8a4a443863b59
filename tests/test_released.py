"""Released weights: hub download selection (offline cache), hub ids, lean loading, bf16 inference
weights, and the memory plan against measured peaks."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub.utils import filter_repo_objects

from varedit_lab.cli import main
from varedit_lab.editing import Editor
from varedit_lab.released import HUB_REPO, MODELS, model_files

REPO = Path(__file__).resolve().parents[1]
# The repository's files (its root, as the upstream infer.py reads them; flan-t5-xl abridged).
HUB_FILES = ["README.md", ".gitattributes", "2B-512.pth", "8B-512.pth", "8B-1024.pth", "infinity_vae_d32reg.pth",
             "infinity_vae_d56_f8_14_patchify.pth", "flan-t5-xl/config.json", "flan-t5-xl/spiece.model",
             "flan-t5-xl/tokenizer_config.json", "flan-t5-xl/model-00001-of-00002.safetensors"]
T5_FILES = {f for f in HUB_FILES if f.startswith("flan-t5-xl/")}


def _benchmark():
    spec = importlib.util.spec_from_file_location("memory_plan_bench", REPO / "benchmarks" / "memory_plan.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("model, own", [("2B-512", {"2B-512.pth", "infinity_vae_d32reg.pth"}),
                                        ("8B-512", {"8B-512.pth", "infinity_vae_d56_f8_14_patchify.pth"}),
                                        ("8B-1024", {"8B-1024.pth", "infinity_vae_d56_f8_14_patchify.pth"})])
def test_download_patterns_select_exactly_one_model(model: str, own: set[str]):
    # filter_repo_objects is what snapshot_download applies to the repository's listing.
    assert set(filter_repo_objects(HUB_FILES, allow_patterns=model_files(model))) == own | T5_FILES


def _prefill_cache(cache: Path, files: list[str]) -> Path:
    """The Hugging Face cache layout of HUB_REPO at one commit holding ``files`` (blobs + symlinks)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / ("models--" + HUB_REPO.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    for i, name in enumerate(files):
        blob = repo / "blobs" / f"{i:040x}"
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(b"{}" if name.endswith(".json") else name.encode())
        link = repo / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    return repo / "snapshots" / commit


def _offline(cache: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "varedit_lab.cli", *args], env=env, capture_output=True, text=True, timeout=120)


def test_download_offline_from_a_prefilled_cache(tmp_path: Path):
    wanted = model_files("2B-512")
    snapshot = _prefill_cache(tmp_path / "hub", sorted(filter_repo_objects(HUB_FILES, allow_patterns=wanted)))
    done = _offline(tmp_path / "hub", "download", "--model", "2B-512")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == str(snapshot)
    # The cache holds only the 2B's files: the 8B cannot be resolved from it, and the error says what is missing.
    missing = _offline(tmp_path / "hub", "download", "--model", "8B-1024")
    assert missing.returncode == 2 and "8B-1024" in missing.stderr and "infinity_vae_d56_f8_14_patchify.pth" in missing.stderr
    unknown = _offline(tmp_path / "hub", "download", "--model", "4B-512")
    assert unknown.returncode == 2 and "valid choices" in unknown.stderr


def test_hub_id_is_accepted_where_a_folder_is(tmp_path: Path):
    _prefill_cache(tmp_path / "hub", HUB_FILES)
    code = ("from varedit_lab.released import resolve_released; "
            "f = resolve_released('HiDream-ai/VAREdit', model='8B-512'); print(f.transformer.name, f.vae.name, f.size, f.resolution)")
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["8B-512.pth", "infinity_vae_d56_f8_14_patchify.pth", "8b", "512"], out.stderr
    assert set(MODELS) == {"2B-512", "8B-512", "8B-1024"}


def test_lean_loading_costs_about_the_file_size():
    # A 2-block checkpoint at half the 2B width (~190 MB); the benchmark runs the full 2B width.
    result = _benchmark().lean_load(depth=2, width=1024, heads=8, text=1024)
    assert result["file_bytes"] > 150e6
    assert result["ratio"] <= 1.3, result


def test_bf16_inference_weights_and_parity(fixture_files: list[Path]):
    path = next(p for p in fixture_files if "sar_256_d32" in p.name)
    fp32 = Editor.from_fixture(path, device="cpu", precision="fp32")
    bf16 = Editor.from_fixture(path, device="cpu", precision="bf16")
    for name, param in bf16.model.named_parameters():
        in_linear = name.startswith("blocks.") and name.rsplit(".", 1)[0] in dict(bf16.model.named_modules()) and isinstance(
            dict(bf16.model.named_modules())[name.rsplit(".", 1)[0]], torch.nn.Linear)
        assert param.dtype == (torch.bfloat16 if in_linear else torch.float32), name
    assert all(p.dtype == torch.float32 for p in fp32.model.parameters())
    linear_bytes = sum(p.numel() * p.element_size() for n, p in bf16.model.named_parameters() if p.dtype == torch.bfloat16)
    assert linear_bytes > 0.4 * sum(p.numel() * 4 for p in bf16.model.parameters()) / 2
    # Teacher-forced logits of the same inputs: bf16 matmuls stay close to fp32.
    from varedit_lab.parity import load_fixture

    fixture = load_fixture(path)
    source = fixture["inputs"]["src_image"][:1]
    latent = fp32.tokenizer.encode_latent(source)
    plan = fp32.strategy.plan(latent, fp32.schedule, fp32.rope_layout, fp32.patchify)
    teacher = torch.randn(1, fp32.schedule.total - 1, fp32.tokenizer.token_channels, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = fp32.model(plan, teacher, fp32.fixed_text)
        with bf16._autocast():
            got = bf16.model(plan, teacher, bf16.fixed_text).float()
    assert (got - want).abs().max() <= 0.05 * want.abs().max()
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.95


def test_plan_is_within_15_percent_of_measured_peaks():
    bench = _benchmark()
    rows = [row for name, ov in bench.CONFIGS.items() for row in bench.check_plan(name, ov)]
    assert len(rows) == 4 and {r["config"] for r in rows} == {"tiny", "M"}
    for row in rows:
        assert abs(row["relative_error"]) <= 0.15, row


def test_plan_cli_sharding_and_largest_batch(capsys: pytest.CaptureFixture):
    config = str(REPO / "experiments" / "released" / "varedit_2b_512.yaml")
    assert main(["plan", config, "--gpu-mem", "80GB", "--json"]) == 0
    ddp = json.loads(capsys.readouterr().out)
    assert main(["plan", config, "trainer=fsdp2", "trainer.num_nodes=2", "--gpu-mem", "80GB", "--json"]) == 0
    fsdp = json.loads(capsys.readouterr().out)
    assert ddp["world_size"] == 8 and fsdp["world_size"] == 16
    assert fsdp["train"]["checkpointing"]["optimizer"] == pytest.approx(ddp["train"]["checkpointing"]["optimizer"] / 16)
    assert ddp["shape"]["params"] == pytest.approx(2.205e9, rel=2e-3)
    # Checkpointing trades activations for recompute: a larger batch fits.
    assert ddp["largest_batch"]["checkpointing"] > ddp["largest_batch"]["no_checkpointing"] >= 1
    assert fsdp["largest_batch"]["checkpointing"] > ddp["largest_batch"]["checkpointing"]
    assert main(["plan", config, "--gpu-mem", "lots"]) == 2


def test_gpu_check_script_runs_on_cpu_at_tiny_size(tmp_path: Path):
    out = tmp_path / "gpu_check.json"
    args = ["--device", "cpu", "--width", "64", "--heads", "2", "--text-channels", "64", "--depth", "2", "--batch", "2",
            "--steps", "2", "--train-size", "64", "--edit-size", "64", "--edit-repeats", "1", "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), *args], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    train, edit = result["train"], result["edit"]
    assert train["sequence_length"] == 37 and len(train["step_times_s"]) == 2 and torch.isfinite(torch.tensor(train["loss"]))
    assert train["planned_trunk_peak_gib"] > 0 and train["model_tflop_per_step"] > 0
    assert edit["seconds_per_edit"] > 0 and edit["seconds_per_edit_full_depth_32"] == pytest.approx(edit["seconds_per_edit"] * 16)


def test_probe_released_weights(fixture_files: list[Path], synthetic_shards: dict, tmp_path: Path, capsys: pytest.CaptureFixture):
    from tests.test_edit import _released_dir_from_fixture, fixture_shape_overrides
    from varedit_lab.parity import load_fixture

    fixture = load_fixture(next(p for p in fixture_files if "sar_256_d32" in p.name))
    root = _released_dir_from_fixture(fixture, tmp_path / "released")
    out = tmp_path / "probe"
    args = ["probe", "--released", str(root), "--model", "2B-256", "--data", synthetic_shards["val"], "--layers", "0", "-1",
            "--samples", "2", "--batch-size", "2", "--out", str(out)]
    for item in fixture_shape_overrides(fixture):
        args += ["--override", item]
    assert main(args) == 0
    probe = json.loads((out / "probe.json").read_text())
    assert probe["config"]["model"] == "2B-256" and probe["config"]["image_size"] == 256
    assert (out / "block_mass.png").is_file()
    with pytest.raises(SystemExit, match="--released needs --data"):
        main(["probe", "--released", str(root), "--model", "2B-256", "--out", str(out)])
