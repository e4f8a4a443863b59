from pathlib import Path

import pytest

from varedit_lab.cli import main
from varedit_lab.config import ConfigError, experiments_dir, load_config

# Folders relative to experiments/ (a checkout under a folder named "sweeps" must not hide every file).
EXPERIMENT_FILES = sorted(
    p for p in experiments_dir().rglob("*.yaml") if not {"sweeps", "launch"} & set(p.relative_to(experiments_dir()).parts)
)


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults_validate():
    cfg = load_config()
    assert cfg.conditioning.name == "sar"
    assert cfg.optim.betas == [0.9, 0.97]


def test_base_include_and_override_order(tmp_path):
    write(tmp_path, "base.yaml", "seed: 1\nmodel:\n  depth: 3\n  width: 96\n")
    child = write(tmp_path, "child.yaml", "base: base.yaml\nmodel:\n  depth: 5\n")
    cfg = load_config(child, ["model.width=128"])
    assert (cfg.seed, cfg.model.depth, cfg.model.width) == (1, 5, 128)


def test_multiple_bases_merge_in_order(tmp_path):
    write(tmp_path, "a.yaml", "seed: 1\noptim:\n  lr: 0.1\n")
    write(tmp_path, "b.yaml", "seed: 2\n")
    cfg = load_config(write(tmp_path, "c.yaml", "base: [a.yaml, b.yaml]\n"))
    assert (cfg.seed, cfg.optim.lr) == (2, 0.1)


def test_typo_names_key_file_and_suggestion(tmp_path):
    path = write(tmp_path, "typo.yaml", "optim:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert "optim.lrr" in msg and str(path) in msg and "optim.lr" in msg


def test_wrong_type_names_expected_type(tmp_path):
    path = write(tmp_path, "bad.yaml", "trainer:\n  max_steps: many\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "trainer.max_steps" in str(err.value) and "int" in str(err.value)


def test_bad_choice_lists_valid_choices():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["model.rope_layout=diagonal"])
    assert "reference_compat" in str(err.value) and "model.rope_layout" in str(err.value)


def test_unknown_strategy_lists_registered():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["conditioning.name=sar2"])
    assert "full_scale" in str(err.value) and "max_scale" in str(err.value)


def test_bad_strategy_option_is_named():
    with pytest.raises(ConfigError, match="layer"):
        load_config(None, ["conditioning.name=sar", "+conditioning.options.layer=[1]"])


def test_circular_base_fails(tmp_path):
    write(tmp_path, "a.yaml", "base: b.yaml\n")
    write(tmp_path, "b.yaml", "base: a.yaml\n")
    with pytest.raises(ConfigError, match="circular"):
        load_config(tmp_path / "a.yaml")


def test_cli_config_show(capsys):
    assert main(["config", "show", "model.depth=3", "seed=7"]) == 0
    out = capsys.readouterr().out
    assert "depth: 3" in out and "seed: 7" in out


def test_cli_config_show_reports_errors(tmp_path, capsys):
    path = write(tmp_path, "typo.yaml", "modle:\n  depth: 2\n")
    assert main(["config", "show", str(path)]) == 2
    assert "did you mean 'model'" in capsys.readouterr().err.lower()


@pytest.mark.parametrize("path", EXPERIMENT_FILES, ids=lambda p: str(p.relative_to(experiments_dir())))
def test_every_experiment_yaml_validates(path):
    load_config(path)
