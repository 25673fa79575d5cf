"""Pipeline parameters: one YAML file, loaded and validated once.

Every knob a reviewer may want to diff lives in ``params.yaml``. This module
reads it, refuses unknown keys, checks types and ranges, and resolves relative
paths against the folder of the params file (never the current directory).

Where the file comes from, first match wins:

1. an explicit path (the ``params_file`` resource setting, ``--params`` on the CLI);
2. the environment variable ``WINE_ASSETS_PARAMS``;
3. ``params.yaml`` in the current directory;
4. the defaults below, with paths relative to the current directory.

The defaults here equal the repository's ``params.yaml``; a test keeps them equal.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

PARAMS_ENV_VAR = "WINE_ASSETS_PARAMS"
DEFAULT_PARAMS_FILE = "params.yaml"
BUILTIN_SOURCE = "builtin"


class ParamsError(ValueError):
    """A params file or override that cannot be used; the message names file and key."""


@dataclass(frozen=True)
class Rule:
    """What a value may be: its type, whether null is allowed, and a range or a choice."""

    kind: type
    nullable: bool = False
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple[Any, ...] | None = None
    extra: Callable[[Any], str | None] | None = None

    def describe(self) -> str:
        parts = []
        if self.low is not None or self.high is not None:
            low = "" if self.low is None else f"{self.low} {'<' if self.low_open else '<='} "
            high = "" if self.high is None else f" {'<' if self.high_open else '<='} {self.high}"
            parts.append(f"{low}value{high}")
        if self.choices is not None:
            parts.append("one of " + ", ".join(repr(c) for c in self.choices))
        if not parts:
            parts.append(f"a {self.kind.__name__}")
        if self.nullable:
            parts.append("or null")
        return " ".join(parts)


def _rule(default: Any, rule: Rule, doc: str) -> Any:
    return field(default=default, metadata={"rule": rule, "doc": doc})


def _not_zero(value: Any) -> str | None:
    return "0 is not allowed (use -1 for all cores, or a positive count)" if value == 0 else None


@dataclass(frozen=True)
class DataParams:
    source: str = _rule(
        BUILTIN_SOURCE,
        Rule(str),
        "'builtin' for the data set scikit-learn ships, or a path to a CSV file",
    )
    test_size: float = _rule(0.2, Rule(float, low=0, high=1, low_open=True, high_open=True), "share of rows held out")
    random_state: int = _rule(42, Rule(int, low=0), "seed of the stratified split")
    watch_dir: str | None = _rule(
        None, Rule(str, nullable=True), "folder whose *.csv files the new-data sensor watches"
    )


@dataclass(frozen=True)
class ModelParams:
    n_estimators: int = _rule(100, Rule(int, low=1), "number of trees")
    max_depth: int | None = _rule(None, Rule(int, nullable=True, low=1), "null: grow fully")
    min_samples_split: int = _rule(2, Rule(int, low=2), "")
    min_samples_leaf: int = _rule(1, Rule(int, low=1), "")
    class_weight: str | None = _rule(None, Rule(str, nullable=True, choices=("balanced", "balanced_subsample")), "")
    random_state: int = _rule(42, Rule(int, low=0), "seed of the forest")
    n_jobs: int = _rule(1, Rule(int, low=-1, extra=_not_zero), "-1: all cores")


@dataclass(frozen=True)
class ValidationParams:
    min_rows_per_class: int = _rule(10, Rule(int, low=2), "fewest rows a class may have and still be split and tested")
    outlier_iqr_factor: float = _rule(
        1.5, Rule(float, low=0, low_open=True), "a value beyond Q1/Q3 -/+ factor x IQR is an outlier"
    )
    max_outlier_share: float = _rule(
        0.05, Rule(float, low=0, high=1), "share of outlier rows in a feature that raises a warning"
    )
    drift_p_value: float = _rule(
        0.01, Rule(float, low=0, high=1, low_open=True), "KS-test p-value below which a feature has drifted"
    )
    drift_reference_rows: int = _rule(
        5000, Rule(int, low=10), "training rows kept with a release as the drift reference"
    )


@dataclass(frozen=True)
class EvaluationParams:
    min_accuracy: float = _rule(0.80, Rule(float, low=0, high=1), "the release gate")
    max_regression: float = _rule(0.02, Rule(float, low=0, high=1), "accuracy drop against production that warns")


@dataclass(frozen=True)
class PathsParams:
    artifacts_dir: str = _rule("artifacts", Rule(str), "model, scaler, metrics and plots")
    registry_dir: str = _rule("registry", Rule(str), "the local model registry")


@dataclass(frozen=True)
class Params:
    """Validated parameters plus the folder that relative paths resolve against."""

    data: DataParams = field(default_factory=DataParams)
    model: ModelParams = field(default_factory=ModelParams)
    validation: ValidationParams = field(default_factory=ValidationParams)
    evaluation: EvaluationParams = field(default_factory=EvaluationParams)
    paths: PathsParams = field(default_factory=PathsParams)
    base_dir: Path = field(default_factory=Path.cwd, compare=False)
    source_file: Path | None = field(default=None, compare=False)

    def resolve(self, path: str | os.PathLike[str]) -> Path:
        """A path from the params, made absolute against the params file's folder."""
        candidate = Path(path).expanduser()
        return candidate if candidate.is_absolute() else (self.base_dir / candidate).resolve()

    @property
    def artifacts_dir(self) -> Path:
        return self.resolve(self.paths.artifacts_dir)

    @property
    def registry_dir(self) -> Path:
        return self.resolve(self.paths.registry_dir)

    @property
    def data_source_path(self) -> Path | None:
        """The CSV source as an absolute path, or None for the built-in data set."""
        if self.data.source == BUILTIN_SOURCE:
            return None
        return self.resolve(self.data.source)

    @property
    def watch_dir(self) -> Path | None:
        return None if self.data.watch_dir is None else self.resolve(self.data.watch_dir)

    @property
    def origin(self) -> str:
        return str(self.source_file) if self.source_file else "built-in defaults"

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """The parameters as plain YAML-ready data, paths as written (not resolved)."""
        return {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}


SECTIONS: dict[str, type] = {
    "data": DataParams,
    "model": ModelParams,
    "validation": ValidationParams,
    "evaluation": EvaluationParams,
    "paths": PathsParams,
}


def _check_value(where: str, key: str, value: Any, rule: Rule) -> Any:
    written = value

    def fail(reason: str) -> ParamsError:
        return ParamsError(f"{where}: {key} = {written!r} {reason}; allowed: {rule.describe()}")

    if value is None:
        if rule.nullable:
            return None
        raise fail("must not be null")
    # bool is an int in Python; a flag where a number belongs is a mistake.
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise fail("has the wrong type")
    if rule.kind is float:
        if isinstance(value, str):
            raise fail("is not a number")
        value = float(value)
        if math.isnan(value) or math.isinf(value):
            raise fail("is not a finite number")
    elif rule.kind is int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int):
            raise fail("is not a whole number")
    elif rule.kind is str:
        if not isinstance(value, str) or not value.strip():
            raise fail("is not a non-empty text")
    if rule.low is not None and (value <= rule.low if rule.low_open else value < rule.low):
        raise fail("is out of range")
    if rule.high is not None and (value >= rule.high if rule.high_open else value > rule.high):
        raise fail("is out of range")
    if rule.choices is not None and value not in rule.choices:
        raise fail("is not an allowed choice")
    if rule.extra is not None and (problem := rule.extra(value)):
        raise fail(problem)
    return value


def _build_section(where: str, name: str, raw: Any) -> Any:
    cls = SECTIONS[name]
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ParamsError(f"{where}: section '{name}' must be a mapping of keys to values")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ParamsError(f"{where}: unknown key {name}.{unknown[0]}; the keys of '{name}' are: {', '.join(fields)}")
    values = {
        key: _check_value(where, f"{name}.{key}", value, fields[key].metadata["rule"]) for key, value in raw.items()
    }
    return cls(**values)


def params_from_mapping(
    raw: Any, *, where: str = "params", base_dir: Path | None = None, source_file: Path | None = None
) -> Params:
    """Validate a parsed params document (a mapping of sections) into Params."""
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ParamsError(f"{where}: the top level must be a mapping of sections ({', '.join(SECTIONS)})")
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise ParamsError(f"{where}: unknown section '{unknown[0]}'; the sections are: {', '.join(SECTIONS)}")
    sections = {name: _build_section(where, name, raw.get(name)) for name in SECTIONS}
    return Params(
        **sections,
        base_dir=(base_dir or Path.cwd()).resolve(),
        source_file=source_file,
    )


def apply_overrides(raw: Mapping[str, Any], overrides: Sequence[str], where: str) -> dict[str, Any]:
    """Apply ``section.key=value`` overrides (values parsed as YAML) to a raw params document."""
    merged: dict[str, Any] = {
        name: dict(value) if isinstance(value, Mapping) else ({} if value is None else value)
        for name, value in raw.items()
    }
    for item in overrides:
        dotted, sep, text = item.partition("=")
        section, dot, key = dotted.strip().partition(".")
        if not sep or not dot or not key:
            raise ParamsError(
                f"override {item!r} is not of the form section.key=value (for example model.n_estimators=50)"
            )
        if section not in SECTIONS:
            raise ParamsError(
                f"override {item!r}: unknown section '{section}'; the sections are: {', '.join(SECTIONS)}"
            )
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError as exc:
            raise ParamsError(f"override {item!r}: the value is not valid YAML ({exc})") from exc
        target = merged.setdefault(section, {})
        if not isinstance(target, dict):
            raise ParamsError(f"{where}: section '{section}' must be a mapping of keys to values")
        target[key.strip()] = value
    return merged


def find_params_file(explicit: str | os.PathLike[str] | None = None) -> Path | None:
    """The params file to use, by the order in the module docstring; None means defaults."""
    if explicit:
        return Path(explicit).expanduser().resolve()
    from_env = os.environ.get(PARAMS_ENV_VAR)
    if from_env:
        return Path(from_env).expanduser().resolve()
    local = Path.cwd() / DEFAULT_PARAMS_FILE
    return local.resolve() if local.is_file() else None


def load_params(path: str | os.PathLike[str] | None = None, overrides: Sequence[str] = ()) -> Params:
    """Find, read and validate the params; raise ParamsError naming file and key on a problem."""
    params_file = find_params_file(path)
    if params_file is None:
        raw: Any = {}
        where = "built-in defaults"
        base_dir = Path.cwd()
    else:
        where = str(params_file)
        base_dir = params_file.parent
        try:
            text = params_file.read_text(encoding="utf-8")
        except FileNotFoundError:
            hint = f" (set by {PARAMS_ENV_VAR})" if not path and os.environ.get(PARAMS_ENV_VAR) else ""
            raise ParamsError(f"params file not found: {params_file}{hint}") from None
        except OSError as exc:
            raise ParamsError(f"params file {params_file} cannot be read: {exc.strerror}") from exc
        try:
            raw = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ParamsError(f"{params_file}: not valid YAML: {exc}") from exc
    if overrides:
        if raw is not None and not isinstance(raw, Mapping):
            raise ParamsError(f"{where}: the top level must be a mapping of sections")
        raw = apply_overrides(raw or {}, overrides, where)
    return params_from_mapping(raw, where=where, base_dir=base_dir, source_file=params_file)


def params_to_yaml(params: Params) -> str:
    """The parameters as YAML text, as stored beside a released model."""
    return yaml.safe_dump(params.to_dict(), sort_keys=False)
