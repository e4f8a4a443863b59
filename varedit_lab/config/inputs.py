"""Checks of the files a resolved config needs, made before anything runs (no torch imported).

``config show`` prints configs whose files do not exist yet; ``train`` (before it creates the run
folder) and ``sweep`` (before it launches or dry-runs anything) call these checks.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from varedit_lab.config.loader import ConfigError, experiments_dir, load_config

TOKENIZER_FILE = "tokenizer.pt"


def missing_tokenizer(cfg: DictConfig) -> str | None:
    """Why an editor config's ``tokenizer.checkpoint`` cannot be used, with the command that makes
    it and the trained tokenizers under ``output_dir`` (e.g. the quick demo's); None when it is fine."""
    if cfg.task != "editor" or not cfg.tokenizer.checkpoint:
        return None
    path = Path(str(cfg.tokenizer.checkpoint))
    if path.exists():
        return None
    lines = [f"tokenizer.checkpoint={path}: no such file (the editor sees images only through a trained tokenizer)."]
    maker = tokenizer_config_writing(path)
    lines.append(f"Make it with:  varedit-lab train {maker}" if maker else
                 "Train one with `varedit-lab train experiments/tokenizer/<config>.yaml` (it writes <run folder>/tokenizer.pt),")
    found = trained_tokenizers(Path(str(cfg.output_dir)))
    if found:
        lines.append("or use one you have:  " + "  |  ".join(f"tokenizer.checkpoint={p}" for p in found))
    else:
        lines.append("or set tokenizer.checkpoint=PATH to a trained tokenizer.")
    return "\n".join(lines)


def tokenizer_config_writing(path: Path) -> str | None:
    """The shipped ``experiments/tokenizer/*.yaml`` whose run writes ``path``, relative to the cwd when possible."""
    target = path.resolve()
    for config in sorted((experiments_dir() / "tokenizer").glob("*.yaml")):
        try:
            cfg = load_config(config)
        except ConfigError:
            continue
        if (Path(str(cfg.output_dir)) / str(cfg.name or config.stem) / TOKENIZER_FILE).resolve() == target:
            try:
                return str(config.relative_to(Path.cwd()))
            except ValueError:
                return str(config)
    return None


def trained_tokenizers(output_dir: Path, limit: int = 3) -> list[Path]:
    """Tokenizer files under ``output_dir`` (current attempts only, newest first)."""
    if not output_dir.is_dir():
        return []
    found = [p for p in output_dir.glob(f"**/{TOKENIZER_FILE}") if "previous" not in p.parts]
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)[:limit]


__all__ = ["missing_tokenizer", "tokenizer_config_writing", "trained_tokenizers"]
