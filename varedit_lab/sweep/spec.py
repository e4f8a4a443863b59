"""Sweep files: the W&B sweep YAML format, with varedit-lab config keys as parameter names.

One file serves both the local runner (``varedit-lab sweep FILE``) and a W&B sweep server
(``wandb sweep FILE`` + ``wandb agent``). Parameters reach the training program only through its
command line (``${args_no_hyphens}`` gives ``key=value``, an OmegaConf dotlist), never through
``wandb.config``, which exists only on rank 0.

Validation runs offline: the ``sweeps`` package (W&B's own sweep engine) checks the schema, and every
parameter name and sample value is resolved through :func:`varedit_lab.config.load_config`, so a
typo fails here, naming the key, instead of in run 7 of 9.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import sys
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

from varedit_lab.config import ConfigError, load_config
from varedit_lab.sweep.claims import Claim, ClaimsError, load_sweep_claims

# Macros that expand to the parameters, and the prefix each gives a ``key=value`` pair.
ARG_MACROS: dict[str, str] = {"${args_no_hyphens}": "", "${args}": "--"}
# Agent macros whose output our config loader cannot read (JSON, "--key value", hydra's "+key").
UNSUPPORTED_MACROS = (
    "${args_json}",
    "${args_json_file}",
    "${args_no_boolean_flags}",
    "${args_no_equals}",
    "${args_append_hydra}",
    "${args_override_hydra}",
)
# The local runner sets these per run (where a run lives and how it is logged): not sweepable.
RUNNER_KEYS = ("output_dir", "name", "logger.group", "logger.name")
# Understood by the W&B server, unknown to the schema of sweeps 0.2.0: checked here, then hidden.
SERVER_ONLY_KEYS = ("run_cap",)
METHODS = ("grid", "random", "bayes")
EXAMPLE_COMMAND = "[${env}, ${interpreter}, -m, varedit_lab.cli, train, EXPERIMENT.yaml, ${args_no_hyphens}]"
_ENVVAR = re.compile(r"\$\{envvar:([A-Za-z0-9_]*)\}")
_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]+")
_SEED_KEYS = ("seed",)
_NAME_PREFIX = {"seed": "s", "conditioning.name": ""}  # sar-s1 rather than name_sar-seed1
_ALWAYS_NAMED = ("conditioning.name",)  # the axis of this project: worth seeing in every run name


class SweepError(ConfigError):
    """An invalid sweep file or sweep directory; the message names the offending key."""


@dataclass(frozen=True)
class SweepSpec:
    """A validated sweep file."""

    name: str
    method: str
    parameters: dict[str, dict[str, Any]]  # in file order
    command: list[str]
    raw: dict[str, Any] = field(repr=False)  # the file as written (what W&B receives)
    path: Path | None = None
    program: str | None = None
    metric: dict[str, str] | None = None  # {"name": ..., "goal": "minimize" | "maximize"}
    run_cap: int | None = None
    project: str | None = None
    claims: tuple[Claim, ...] = ()  # declared beside the file (<name>.claims.yaml), see sweep.claims

    @property
    def swept_keys(self) -> list[str]:
        """Parameters that take more than one value (constants do not name runs)."""
        return [k for k, p in self.parameters.items() if "value" not in p]

    @property
    def name_keys(self) -> list[str]:
        """Parameters that name runs: the swept ones, plus the strategy even when it is fixed."""
        return [k for k in self.parameters if k in self.swept_keys or k in _ALWAYS_NAMED]

    @property
    def group_keys(self) -> list[str]:
        """Swept parameters other than the seed: the report compares these, averaging over seeds."""
        return [k for k in self.swept_keys if k not in _SEED_KEYS]

    @property
    def experiment(self) -> str | None:
        """The experiment YAML the command trains (the token after ``train``), if any."""
        return experiment_of(self.command, self.program)

    def sweep_config(self) -> dict[str, Any]:
        """The dict the ``sweeps`` engine understands (server-only keys removed)."""
        return {k: v for k, v in self.raw.items() if k not in SERVER_ONLY_KEYS}


# -- loading -------------------------------------------------------------------------------------


def read_sweep_file(path: str | Path) -> dict[str, Any]:
    """Parse a sweep YAML as W&B does (plain YAML: ``${...}`` macros are not interpolated)."""
    path = Path(path)
    if not path.is_file():
        raise SweepError(f"sweep file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise SweepError(f"{path}: cannot parse YAML: {err}") from None
    if not isinstance(raw, dict):
        raise SweepError(f"{path}: a sweep file must be a mapping, got {type(raw).__name__}")
    return raw


def load_sweep(path: str | Path, *, allow_custom_command: bool = False) -> SweepSpec:
    """Read and validate a sweep file and its claims; raises :class:`SweepError` listing every problem."""
    spec = parse_sweep(read_sweep_file(path), source=str(path), path=Path(path), allow_custom_command=allow_custom_command)
    try:
        claims = load_sweep_claims(path, spec.parameters)
    except ClaimsError as err:
        raise SweepError(str(err)) from None
    return replace(spec, claims=claims)


def parse_sweep(
    raw: dict[str, Any], source: str = "<sweep>", path: Path | None = None, *, allow_custom_command: bool = False
) -> SweepSpec:
    problems = sweep_problems(raw, allow_custom_command=allow_custom_command)
    if problems:
        raise SweepError(f"{source}: invalid sweep file:\n" + "\n".join(f"  - {p}" for p in problems))
    default_name = path.stem if path is not None else "sweep"
    metric = raw.get("metric")
    return SweepSpec(
        name=safe_name(str(raw.get("name") or default_name)),
        method=raw["method"],
        parameters=dict(raw["parameters"]),
        command=_anchor_experiment([str(t) for t in raw["command"]], path),
        raw=raw,
        path=path.resolve() if path is not None else None,
        program=raw.get("program"),
        metric={"name": metric["name"], "goal": metric.get("goal", "minimize")} if metric else None,
        run_cap=raw.get("run_cap"),
        project=raw.get("project"),
    )


def _anchor_experiment(command: list[str], path: Path | None) -> list[str]:
    """Make a relative experiment YAML absolute when it is found next to the sweep file's folders.

    Sweep files name the experiment relative to the repository root (where ``wandb agent`` runs);
    locally the sweep may be launched from anywhere, so the path is looked up from the sweep
    file's folder upwards when it does not exist from the working directory.
    """
    experiment = experiment_of(command, None)
    if experiment is None or path is None or Path(experiment).is_absolute() or Path(experiment).is_file():
        return command
    for folder in Path(path).resolve().parents:
        if (folder / experiment).is_file():
            index = command.index(experiment)
            return [*command[:index], str(folder / experiment), *command[index + 1 :]]
    return command


# -- validation ----------------------------------------------------------------------------------


def sweep_problems(raw: dict[str, Any], *, allow_custom_command: bool = False) -> list[str]:
    """Every problem of a sweep file, each naming its key; empty when the file is valid."""
    problems = _schema_problems(raw)
    params = raw.get("parameters")
    if isinstance(params, dict):
        # A parameter the schema already rejects cannot be sampled: skip its config-key check.
        bad = {n for n in params if any(p.startswith((f"parameters.{n}:", f"parameters.{n}.")) for p in problems)}
        problems += _parameter_problems(params, raw.get("method"), skip=bad)
    if raw.get("method") == "bayes" and not (isinstance(raw.get("metric"), dict) and raw["metric"].get("name")):
        problems.append("metric: method 'bayes' needs metric.name (and metric.goal) to optimise")
    problems += _command_problems(raw, allow_custom_command)
    return list(dict.fromkeys(problems))  # sweeps repeats some messages


def _schema_problems(raw: dict[str, Any]) -> list[str]:
    """The ``sweeps`` package's checks, with the path of each violation prefixed."""
    sweeps = import_sweeps()
    from sweeps.config.schema import validator

    problems = []
    cap = raw.get("run_cap")
    if cap is not None and not (isinstance(cap, int) and not isinstance(cap, bool) and cap >= 1):
        problems.append(f"run_cap: must be a positive integer, got {cap!r}")
    config = {k: v for k, v in raw.items() if k not in SERVER_ONLY_KEYS}
    for err in validator.iter_errors(config):
        where = _json_path(err.absolute_path)
        problems.append(f"{where}: {err.message}" if where else err.message)
    params = config.get("parameters")
    if isinstance(params, dict):
        for name, conf in params.items():
            if not isinstance(conf, dict):
                problems.append(f"parameters.{name}: must be a mapping with 'value', 'values' or 'distribution', got {conf!r}")
            elif "parameters" in conf:
                problems.append(f"parameters.{name}: nested parameters are not supported; write dotted config keys (e.g. 'optim.lr')")
        if all(isinstance(c, dict) for c in params.values()):
            try:
                extra = sweeps.schema_violations_from_proposed_config(config)
            except ValueError as err:
                extra = [str(err)]
            # Messages already reported with a path above are dropped; min/max checks are kept.
            seen = {e.message for e in validator.iter_errors(config)}
            problems += [f"parameters.{m}" if _names_parameter(m, params) else m for m in extra if m not in seen]
    # sweeps adds a generic "invalid hyperparameter configuration: X" after the specific message.
    named = {p.split(":", 1)[0] for p in problems}
    return [p for p in problems if not _is_generic_duplicate(p, named)]


def _is_generic_duplicate(message: str, named: set[str]) -> bool:
    prefix = "invalid hyperparameter configuration: "
    return message.startswith(prefix) and f"parameters.{message[len(prefix):]}" in named


def _names_parameter(message: str, params: Mapping[str, Any]) -> bool:
    return any(message.startswith(f"{name}:") for name in params)


def _json_path(path: Iterable[Any]) -> str:
    return ".".join(str(p) for p in path)


def _parameter_problems(params: dict[str, Any], method: Any, skip: set[str]) -> list[str]:
    problems = []
    strategies = _strategy_candidates(params)
    for key, conf in params.items():
        if key in skip or not isinstance(conf, dict) or "parameters" in conf:
            continue
        if key in RUNNER_KEYS:
            problems.append(f"parameters.{key}: set by the sweep runner for every run; it cannot be swept")
            continue
        if method == "grid" and grid_values(key, conf) is None:
            problems.append(
                f"parameters.{key}: grid search needs 'value', 'values', int_uniform or q_uniform, got {_describe(conf)}"
            )
            continue
        problem = _config_key_problem(key, sample_values(key, conf), strategies)
        if problem:
            problems.append(f"parameters.{key}: {problem}")
    return problems


def _describe(conf: dict[str, Any]) -> str:
    return f"distribution '{conf['distribution']}'" if "distribution" in conf else repr(conf)


def _strategy_candidates(params: dict[str, Any]) -> list[str]:
    """Strategies a ``conditioning.options.*`` value may be meant for (the swept ones, else the default)."""
    conf = params.get("conditioning.name")
    if isinstance(conf, dict):
        values = conf.get("values", [conf["value"]] if "value" in conf else [])
        if values:
            return [str(v) for v in values]
    return [str(load_config().conditioning.name)]


def _config_key_problem(key: str, samples: list[Any], strategies: list[str]) -> str | None:
    """Resolve ``key=sample`` through the config loader; the first failure, or None."""
    for value in samples:
        item = format_override(key, value)
        if key.startswith("conditioning.options."):
            errors = []
            for strategy in strategies:
                try:
                    load_config(None, [f"conditioning.name={strategy}", item])
                    break
                except ConfigError as err:
                    errors.append(_strip_source(str(err)))
            else:
                return f"value {value!r} is accepted by none of the strategies {strategies}: {errors[0]}"
            continue
        try:
            load_config(None, [item])
        except ConfigError as err:
            message = _strip_source(str(err))
            return message if message.startswith("unknown key") else f"value {value!r}: {message}"
    return None


def _strip_source(message: str) -> str:
    """Drop the loader's "<overrides>: " / "override 'k=v': " prefixes (the caller names the key)."""
    return re.sub(r"^(<overrides>: )?(override '.*?': )?", "", message, count=1)


def _command_problems(raw: dict[str, Any], allow_custom_command: bool) -> list[str]:
    command = raw.get("command")
    if command is None:
        return [f"command: missing; the runner and the W&B agent need one, e.g. {EXAMPLE_COMMAND}"]
    if not isinstance(command, list) or not command:
        return [f"command: must be a non-empty list, e.g. {EXAMPLE_COMMAND}"]
    tokens = [str(t) for t in command]
    problems = []
    arg_macros = [t for t in tokens if t in ARG_MACROS]
    if len(arg_macros) != 1:
        problems.append(
            "command: must contain exactly one ${args_no_hyphens} (or ${args}) so that every rank gets the "
            f"parameters on its command line; found {len(arg_macros)}"
        )
    unsupported = [t for t in tokens if t in UNSUPPORTED_MACROS]
    if unsupported:
        problems.append(f"command: {unsupported} give arguments the config loader cannot read; use ${{args_no_hyphens}}")
    if "${program}" in tokens and not raw.get("program"):
        problems.append("program: the command uses ${program} but the file sets no 'program'")
    if not allow_custom_command and train_index(tokens, raw.get("program")) is None:
        problems.append(
            f"command: must run the varedit-lab train command, e.g. {EXAMPLE_COMMAND}; got {tokens} "
            "(pass --allow-custom-command for another program that takes varedit-lab config overrides)"
        )
    return problems


def train_index(tokens: list[str], program: str | None) -> int | None:
    """Index of the ``train`` token of ``varedit_lab.cli train`` / ``varedit-lab train``, if present."""
    expanded = [str(program) if t == "${program}" and program else t for t in tokens]
    for i, tok in enumerate(expanded[:-1]):
        if expanded[i + 1] == "train" and _is_varedit_cli(tok):
            return i + 1
    return None


def _is_varedit_cli(token: str) -> bool:
    normalized = token.replace("\\", "/")
    return (
        token in ("varedit_lab.cli", "varedit-lab")
        or normalized.endswith("/varedit-lab")
        or normalized.endswith("varedit_lab/cli/__main__.py")
        or normalized.endswith("varedit_lab/cli")
    )


def experiment_of(tokens: list[str], program: str | None) -> str | None:
    """The experiment YAML argument after ``train`` (any program when the command is custom)."""
    index = train_index(tokens, program)
    if index is None:
        index = next((i for i, t in enumerate(tokens) if t == "train"), None)
    if index is None or index + 1 >= len(tokens):
        return None
    candidate = tokens[index + 1]
    if candidate.startswith("$") or "=" in candidate or not candidate.endswith((".yaml", ".yml")):
        return None
    return candidate


# -- parameter values ----------------------------------------------------------------------------


def import_sweeps() -> Any:
    """The ``sweeps`` package (W&B's sweep engine), imported quietly, or a clear install hint."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydantic v1-style config warnings on import
            import sweeps
    except ImportError:
        raise SweepError("sweeps need the 'sweeps' package: pip install sweeps==0.2.0 (or pip install -e .)") from None
    return sweeps


def grid_values(key: str, conf: dict[str, Any]) -> list[Any] | None:
    """The values a grid takes for one parameter, as W&B's grid search expands them; None if continuous."""
    import_sweeps()
    from sweeps.params import HyperParameter

    try:
        param = HyperParameter(key, conf)
    except Exception:  # noqa: BLE001 - reported by the schema check
        return None
    if param.type == HyperParameter.CONSTANT:
        return [to_python(param.config["value"])]
    if param.type == HyperParameter.CATEGORICAL:
        return [to_python(v) for v in param.config["values"]]
    if param.type == HyperParameter.INT_UNIFORM:
        return list(range(param.config["min"], param.config["max"] + 1))
    if param.type == HyperParameter.Q_UNIFORM:
        import numpy as np

        return to_python(np.arange(param.config["min"], param.config["max"], param.config["q"]).tolist())
    return None


def sample_values(key: str, conf: dict[str, Any]) -> list[Any]:
    """Representative values of a parameter (all categories; low/median/high quantiles otherwise)."""
    discrete = grid_values(key, conf)
    if discrete is not None:
        return discrete
    import_sweeps()
    from sweeps.params import HyperParameter

    try:
        param = HyperParameter(key, conf)
        return [to_python(param.ppf(q)) for q in (0.01, 0.5, 0.99)]
    except Exception:  # noqa: BLE001 - reported by the schema check
        return []


def to_python(value: Any) -> Any:
    """numpy scalars/arrays (what ``sweeps`` proposes) to plain Python, recursively."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return [to_python(v) for v in value]
    if isinstance(value, dict):
        return {str(k): to_python(v) for k, v in value.items()}
    return value


def format_override(key: str, value: Any, prefix: str = "") -> str:
    """``key=value`` exactly as the W&B agent formats ``${args_no_hyphens}`` (``f"{k}={v}"``)."""
    return f"{prefix}{key}={to_python(value)}"


# -- commands ------------------------------------------------------------------------------------


def _expand_envvars(token: str) -> str:
    # Like the agent: an unset variable leaves its name in place.
    return _ENVVAR.sub(lambda m: os.environ.get(m.group(1), m.group(1)), token)


def expand_command(
    spec: SweepSpec, params: Mapping[str, Any], extra: Iterable[str] = (), *, interpreter: str | None = None, env: str | None = None
) -> list[str]:
    """The argv of one run: the ``command`` list with its macros filled in.

    ``extra`` are ``key=value`` overrides placed after the parameters (the runner's per-run
    settings), so they win. Locally ``${interpreter}`` is this Python and ``${env}`` is dropped;
    :func:`agent_command` gives what ``wandb agent`` runs instead.
    """
    interpreter = interpreter or sys.executable
    argv: list[str] = []
    for token in spec.command:
        token = _expand_envvars(token)
        if token == "${env}":
            argv += [env] if env else []
        elif token == "${interpreter}":
            argv.append(interpreter)
        elif token == "${program}":
            argv.append(str(spec.program))
        elif token in ARG_MACROS:
            prefix = ARG_MACROS[token]
            argv += [format_override(k, v, prefix) for k, v in params.items()]
            argv += [f"{prefix}{item}" for item in extra]
        else:
            argv.append(token)
    return argv


def agent_command(spec: SweepSpec, params: Mapping[str, Any]) -> list[str]:
    """What ``wandb agent`` runs for ``params`` (``${env}`` → /usr/bin/env, ``${interpreter}`` → python)."""
    return expand_command(spec, params, interpreter="python", env="/usr/bin/env")


# -- run names -----------------------------------------------------------------------------------


def safe_name(text: str) -> str:
    """A file-system and W&B friendly name."""
    return _UNSAFE.sub("_", text).strip("._-") or "sweep"


def params_hash(params: Mapping[str, Any], length: int = 6) -> str:
    data = json.dumps({k: to_python(v) for k, v in params.items()}, sort_keys=True, default=str)
    return hashlib.sha1(data.encode()).hexdigest()[:length]


def _value_text(value: Any) -> tuple[str, bool]:
    """A short rendering of a value and whether it is exact (rounded floats are not)."""
    if isinstance(value, bool):
        return str(value).lower(), True
    if isinstance(value, float):
        text = f"{value:.3g}"
        return text, (float(text) == value) if math.isfinite(value) else True
    if isinstance(value, (list, tuple)):
        parts = [_value_text(v) for v in value]
        return "_".join(p for p, _ in parts), all(exact for _, exact in parts)
    return str(value).rsplit(":", 1)[-1], True  # 'pkg.module:Class' strategies → 'Class'


def run_name(params: Mapping[str, Any], keys: Iterable[str], max_len: int = 48, hash_lossy: bool = True) -> str:
    """Deterministic run name from the swept values: ``{conditioning.name: sar, seed: 1}`` → ``sar-s1``.

    A short hash of all parameters is appended when the readable part is lossy (rounded floats,
    unsafe characters) or too long, so distinct parameter sets never share a name. Callers that make
    names unique otherwise (random/bayes prefix the run index) pass ``hash_lossy=False``.
    """
    tokens, exact = [], True
    for key in keys:
        text, is_exact = _value_text(to_python(params[key]))
        prefix = _NAME_PREFIX.get(key, key.rsplit(".", 1)[-1])
        tokens.append(f"{prefix}{text}")
        exact = exact and is_exact
    readable = "-".join(tokens)
    name = safe_name(readable) if tokens else "run"
    if (hash_lossy and (not exact or name != readable)) or len(name) > max_len:
        name = f"{name[: max_len - 7]}-{params_hash(params)}"
    return name
