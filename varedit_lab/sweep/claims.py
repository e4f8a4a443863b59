"""Claims declared before a sweep runs: ``<sweep>.claims.yaml`` beside the sweep file.

W&B's sweep schema (``sweeps`` 0.2.0, and the server) rejects unknown top-level keys, so the claims
live in a sidecar: ``experiments/sweeps/conditioning_ablation.yaml`` →
``experiments/sweeps/conditioning_ablation.claims.yaml``::

    claims:
      - name: sar_beats_max_coarse_ce_in      # a short identifier, unique in the file
        metric: val/ce_in_coarse              # a metric the runs log (see METRIC_PATTERNS)
        arm: sar                              # value of ``arm_key`` in the sweep ...
        baseline: max_scale                   # ... compared with this one (arm − baseline)
        direction: lower                      # which values of the metric are better
        delta_relative: 0.015                 # "refuted at δ": δ = 1.5 % of |baseline mean|
        paper_effect: 0.06                    # relative effect the paper reports (seeds needed)
        # arm_key: conditioning.name          # default; any swept parameter names the arms
        # where: {model.rope_layout: release}  # optional: only runs with these parameter values

The claim is always "``arm`` is better than ``baseline`` on ``metric``" (better per ``direction``).
``delta`` (metric units) or ``delta_relative`` (a fraction of the baseline's mean) sets δ. A typo
fails when the sweep is loaded, before anything runs, naming the key and the valid choices.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from varedit_lab.config import ConfigError

CLAIMS_SUFFIX = ".claims.yaml"
FROZEN_NAME = "claims.yaml"  # the copy a sweep directory keeps from its first launch
DEFAULT_ARM_KEY = "conditioning.name"
DIRECTIONS = ("higher", "lower")
REQUIRED_KEYS = ("name", "metric", "arm", "baseline", "direction")
OPTIONAL_KEYS = ("delta", "delta_relative", "paper_effect", "arm_key", "where", "note")
CLAIM_KEYS = REQUIRED_KEYS + OPTIONAL_KEYS
# The metric names the runs log (the training side's contract), as (pattern, how it is written).
METRIC_PATTERNS: tuple[tuple[str, str], ...] = (
    (r"val/(ce|bitacc)_(in|out)/s\d+", "val/{ce,bitacc}_{in,out}/s{k}"),
    (r"val/ce_(in|out)(_coarse|_fine)?", "val/ce_{in,out}[_coarse|_fine]"),
    (r"val/(copy_)?(success|preservation|balance)", "val/[copy_]{success,preservation,balance}"),
    (r"val/(loss|bit_acc)", "val/{loss,bit_acc}"),
    (r"val/scale\d+_bit_acc", "val/scale{k}_bit_acc"),
    (r"perf/(seq_len|train_step_s)", "perf/{seq_len,train_step_s}"),
)
_NAME = re.compile(r"^[A-Za-z0-9_.+-]+$")


class ClaimsError(ConfigError):
    """An invalid claims file; the message names the offending key and the valid choices."""


@dataclass(frozen=True)
class Claim:
    name: str
    metric: str
    arm: Any
    baseline: Any
    direction: str  # "higher" or "lower": which values are better
    delta: float | None = None  # absolute δ, metric units
    delta_relative: float | None = None  # δ as a fraction of |baseline mean|
    paper_effect: float | None = None  # relative effect (fraction of the baseline) the paper reports
    arm_key: str = DEFAULT_ARM_KEY
    where: dict[str, Any] = field(default_factory=dict)
    note: str = ""

    @property
    def sign(self) -> int:
        """+1 when higher is better: ``sign · (arm − baseline) > 0`` is the claimed effect."""
        return 1 if self.direction == "higher" else -1

    @property
    def sample_field(self) -> str | None:
        """The ``samples.jsonl`` field of the metric (``val/ce_in_coarse`` → ``ce_in_coarse``), if any."""
        head, _, rest = self.metric.partition("/")
        return rest if head == "val" and rest and "/" not in rest else None

    def describe(self) -> str:
        where = "".join(f", {k}={v}" for k, v in self.where.items())
        return f"{self.arm} better than {self.baseline} on `{self.metric}` ({self.direction} is better{where})"


def known_metric(name: str) -> bool:
    return any(re.fullmatch(pattern, name) for pattern, _ in METRIC_PATTERNS)


def claims_path(sweep_file: str | Path) -> Path:
    """Where a sweep file's claims live: ``name.yaml`` → ``name.claims.yaml``."""
    path = Path(sweep_file)
    return path.with_name(path.stem + CLAIMS_SUFFIX)


def is_claims_file(path: str | Path) -> bool:
    return Path(path).name.endswith(CLAIMS_SUFFIX)


# -- parameter values ----------------------------------------------------------------------------


def parameter_values(conf: Any) -> list[Any] | None:
    """The discrete values of a sweep parameter (``value`` / ``values``), None if it is a distribution."""
    if not isinstance(conf, Mapping):
        return None
    if "values" in conf and isinstance(conf["values"], list):
        return list(conf["values"])
    if "value" in conf:
        return [conf["value"]]
    return None


def _suggest(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1)
    return f"; did you mean '{close[0]}'?" if close else ""


# -- validation ----------------------------------------------------------------------------------


def claims_problems(raw: Any, parameters: Mapping[str, Any]) -> list[str]:
    """Every problem of a claims file (already parsed YAML) against the sweep's parameters."""
    if not isinstance(raw, Mapping):
        return [f"the file must be a mapping with a 'claims' list, got {type(raw).__name__}"]
    problems = [f"{k}: unknown top-level key; valid: ['claims']{_suggest(str(k), ['claims'])}" for k in raw if k != "claims"]
    entries = raw.get("claims")
    if not isinstance(entries, list) or not entries:
        return problems + ["claims: must be a non-empty list of claims"]
    names: list[str] = []
    for index, entry in enumerate(entries):
        label = f"claims[{index}]" + (f" ({entry['name']})" if isinstance(entry, Mapping) and "name" in entry else "")
        if not isinstance(entry, Mapping):
            problems.append(f"{label}: must be a mapping with keys {list(REQUIRED_KEYS)}")
            continue
        problems += [f"{label}.{p}" for p in _entry_problems(entry, parameters)]
        names.append(str(entry.get("name")))
    problems += [f"claims: the name '{n}' is used more than once" for n in sorted({n for n in names if names.count(n) > 1})]
    return problems


def _entry_problems(entry: Mapping[str, Any], parameters: Mapping[str, Any]) -> list[str]:
    problems = [f"{k}: unknown key; valid keys: {list(CLAIM_KEYS)}{_suggest(str(k), list(CLAIM_KEYS))}" for k in entry if k not in CLAIM_KEYS]
    problems += [f"{k}: missing (required keys: {list(REQUIRED_KEYS)})" for k in REQUIRED_KEYS if k not in entry]
    name = entry.get("name")
    if "name" in entry and not (isinstance(name, str) and _NAME.match(name)):
        problems.append(f"name: {name!r} must be a non-empty string of letters, digits and _.+-")
    metric = entry.get("metric")
    if "metric" in entry and not (isinstance(metric, str) and known_metric(metric)):
        patterns = [text for _, text in METRIC_PATTERNS]
        problems.append(f"metric: unknown metric {metric!r}; valid: {patterns}")
    direction = entry.get("direction")
    if "direction" in entry and direction not in DIRECTIONS:
        problems.append(f"direction: {direction!r} is not one of {list(DIRECTIONS)} (which values of the metric are better)")
    problems += _delta_problems(entry)
    problems += _arm_problems(entry, parameters)
    return problems


def _positive(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


def _delta_problems(entry: Mapping[str, Any]) -> list[str]:
    given = [k for k in ("delta", "delta_relative") if k in entry]
    problems = []
    if len(given) != 1:
        problems.append(f"delta: give exactly one of 'delta' (metric units) or 'delta_relative' (fraction of the baseline), got {given or 'none'}")
    problems += [f"{k}: must be a positive number, got {entry[k]!r}" for k in (*given, "paper_effect") if k in entry and not _positive(entry[k])]
    return problems


def _arm_problems(entry: Mapping[str, Any], parameters: Mapping[str, Any]) -> list[str]:
    arm_key = entry.get("arm_key", DEFAULT_ARM_KEY)
    swept = [k for k, conf in parameters.items() if parameter_values(conf) is not None]
    if arm_key not in parameters:
        return [f"arm_key: '{arm_key}' is not a parameter of the sweep; valid: {swept}{_suggest(str(arm_key), swept)}"]
    values = parameter_values(parameters[arm_key])
    if values is None:
        return [f"arm_key: '{arm_key}' is a distribution, not a list of arms; valid: {swept}"]
    problems = []
    for key in ("arm", "baseline"):
        if key in entry and entry[key] not in values:
            problems.append(f"{key}: {entry[key]!r} is not a value of {arm_key} in the sweep; valid: {values}")
    if "arm" in entry and entry.get("arm") == entry.get("baseline"):
        problems.append(f"baseline: the same as arm ({entry['arm']!r}); a claim compares two arms")
    where = entry.get("where", {})
    if not isinstance(where, Mapping):
        return problems + [f"where: must be a mapping of sweep parameter → value, got {where!r}"]
    for key, value in where.items():
        allowed = parameter_values(parameters.get(key))
        if key == arm_key or allowed is None:
            choices = [k for k in swept if k != arm_key]
            problems.append(f"where.{key}: not a discrete sweep parameter other than the arm key; valid: {choices}")
        elif value not in allowed:
            problems.append(f"where.{key}: {value!r} is not one of its values {allowed}")
    return problems


# -- loading -------------------------------------------------------------------------------------


def parse_claims(raw: Any, parameters: Mapping[str, Any], source: str = "<claims>") -> tuple[Claim, ...]:
    """Validated claims; raises :class:`ClaimsError` listing every problem."""
    problems = claims_problems(raw, parameters)
    if problems:
        raise ClaimsError(f"{source}: invalid claims:\n" + "\n".join(f"  - {p}" for p in problems))
    return tuple(
        Claim(
            name=entry["name"],
            metric=entry["metric"],
            arm=entry["arm"],
            baseline=entry["baseline"],
            direction=entry["direction"],
            delta=_float_or_none(entry.get("delta")),
            delta_relative=_float_or_none(entry.get("delta_relative")),
            paper_effect=_float_or_none(entry.get("paper_effect")),
            arm_key=entry.get("arm_key", DEFAULT_ARM_KEY),
            where=dict(entry.get("where") or {}),
            note=str(entry.get("note") or ""),
        )
        for entry in raw["claims"]
    )


def _float_or_none(value: Any) -> float | None:
    return None if value is None else float(value)


def read_claims_file(path: str | Path) -> Any:
    path = Path(path)
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ClaimsError(f"{path}: cannot parse YAML: {err}") from None


def load_claims(path: str | Path, parameters: Mapping[str, Any]) -> tuple[Claim, ...]:
    """The claims in ``path`` (a claims file), validated against the sweep's ``parameters``."""
    return parse_claims(read_claims_file(path), parameters, source=str(path))


def load_sweep_claims(sweep_file: str | Path, parameters: Mapping[str, Any]) -> tuple[Claim, ...]:
    """The claims beside a sweep file, or none when it has no ``.claims.yaml``."""
    path = claims_path(sweep_file)
    return load_claims(path, parameters) if path.is_file() else ()


def freeze_claims(sweep_file: str | Path | None, sweep_dir: Path) -> str | None:
    """Keep the claims as they were at the sweep's first launch in ``<sweep_dir>/claims.yaml``.

    The report evaluates this copy, so editing the sidecar after results exist cannot change what is
    tested. Returns a note when the sidecar no longer matches the frozen copy, else None.
    """
    if sweep_file is None or not claims_path(sweep_file).is_file():
        return None
    text = claims_path(sweep_file).read_text()
    frozen = Path(sweep_dir) / FROZEN_NAME
    if not frozen.is_file():
        frozen.parent.mkdir(parents=True, exist_ok=True)
        frozen.write_text(text)
        return None
    if frozen.read_text() != text:
        return (
            f"note: {claims_path(sweep_file)} changed since this sweep started; the report keeps evaluating the "
            f"claims declared before running ({frozen}). Use another --dir to test new claims."
        )
    return None

