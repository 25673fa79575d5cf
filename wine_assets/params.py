"""Pipeline parameters: one YAML file, loaded and validated once.

Every knob a reviewer may want to diff lives in ``params.yaml``. This module
reads it and validates each section with a pydantic model (unknown keys refused,
strict types, ``Field`` bounds), turns pydantic's errors into messages that name
the file, the key, the value and the allowed range, and resolves relative paths
against the folder of the params file (never the current directory).

Where the file comes from, first match wins:

1. an explicit path (the ``params_file`` resource setting, ``--params`` on the CLI);
2. the environment variable ``WINE_ASSETS_PARAMS``;
3. ``params.yaml`` in the current directory;
4. the defaults below, with paths relative to the current directory.

The defaults here equal the repository's ``params.yaml``; a test keeps them equal.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

import annotated_types
import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)
from pydantic.fields import FieldInfo

PARAMS_ENV_VAR = "WINE_ASSETS_PARAMS"
DEFAULT_PARAMS_FILE = "params.yaml"
BUILTIN_SOURCE = "builtin"


class ParamsError(ValueError):
    """A params file or override that cannot be used; the message names file and key."""


# -- reading YAML: aliases counted while the document is composed, before any object is built --
# An alias (*name) makes a value appear again without copying it, so ten nested lines of ten
# aliases each stand for 10^9 values (the "billion laughs" document): small to read, but every
# walk over the result (validation, writing the hyperparameters out) expands it. A params file
# needs no alias. A few are allowed for a reader who shares a block; with at most 8, what the
# document stands for is at most 19 times its own size (8 aliases spread over nested anchors
# repeat a part at most 3 x 3 x 2 = 18 more times), so memory and time stay bounded by the file's.
MAX_YAML_ALIASES = 8


class _TooManyAliases(Exception):
    def __init__(self, key: str, event: yaml.Event):
        super().__init__(key)
        self.key, self.event = key, event


class _ParamsLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing the alias after the first MAX_YAML_ALIASES as it composes
    (the node graph holds each anchored value once, so nothing has been expanded yet); it keeps
    the key path it is in, so the refusal names the key."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._aliases = 0
        self._path: list[str] = []

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        step = None
        if isinstance(parent, yaml.MappingNode) and isinstance(index, yaml.ScalarNode):
            step = f".{index.value}"
        elif isinstance(parent, yaml.SequenceNode) and isinstance(index, int):
            step = f"[{index}]"
        if step is not None:
            self._path.append(step)
        try:
            if self.check_event(yaml.AliasEvent):
                self._aliases += 1
                if self._aliases > MAX_YAML_ALIASES:
                    raise _TooManyAliases("".join(self._path).lstrip(".") or "the top level", self.peek_event())
            return super().compose_node(parent, index)
        finally:
            if step is not None:
                self._path.pop()


def load_yaml(text: str, where: str) -> Any:
    """A YAML document (safe types only) from params text; ParamsError naming ``where`` and the key
    when it is not valid YAML or holds more than MAX_YAML_ALIASES aliases."""
    loader = _ParamsLoader(text)
    try:
        return loader.get_single_data()
    except _TooManyAliases as exc:
        mark = exc.event.start_mark
        anchor = getattr(exc.event, "anchor", None)
        raise ParamsError(
            f"{where}: {exc.key} (line {mark.line + 1}, column {mark.column + 1}): alias *{anchor} is one more "
            f"than the {MAX_YAML_ALIASES} YAML aliases a params file may hold (each can multiply the document's "
            "size); write the values out instead"
        ) from None
    except yaml.YAMLError as exc:
        raise ParamsError(f"{where}: not valid YAML: {exc}") from exc
    finally:
        loader.dispose()


def _whole_float_to_int(value: Any) -> Any:
    # YAML writes 100.0 for a count now and then; a whole float is that count. 2.5 stays a float
    # and is refused by the strict int type.
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    return value


# strict: YAML already gives typed values, so "0.2" (text), true (a flag) or null are mistakes
# where a number belongs, never something to coerce. Integers are accepted where a float belongs.
Count = Annotated[int, BeforeValidator(_whole_float_to_int)]
Text = Annotated[str, Field(pattern=r"\S")]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


class DataParams(_Section):
    source: Text = Field(BUILTIN_SOURCE, description="'builtin' for the data set scikit-learn ships, or a CSV path")
    test_size: float = Field(0.2, gt=0, lt=1, description="share of rows held out")
    random_state: Count = Field(42, ge=0, description="seed of the stratified split")
    watch_dir: Text | None = Field(None, description="folder whose *.csv files the new-data sensor watches")


ESTIMATOR_FAMILIES = ("random_forest", "extra_trees", "gradient_boosting", "logistic_regression", "decision_tree")
DASK_FAMILIES = ("random_forest", "extra_trees")  # the families whose fit joblib spreads over a cluster
ESTIMATOR_ARGS = "estimator_args"  # where another family's own hyperparameters are kept (written flat)


class ModelParams(_Section):
    """The model training_job fits: a family and its hyperparameters.

    ``random_forest`` (the default) has the typed keys below, each checked here. Another family
    (the ones experiments compare) takes scikit-learn's own hyperparameter names, written flat
    beside ``family`` as in an experiment variant; scikit-learn checks them when the model is built.
    """

    family: Literal[ESTIMATOR_FAMILIES] = Field("random_forest", description="the scikit-learn family")
    n_estimators: Count = Field(100, ge=1, description="number of trees")
    max_depth: Count | None = Field(None, ge=1, description="null: grow fully")
    min_samples_split: Count = Field(2, ge=2)
    min_samples_leaf: Count = Field(1, ge=1)
    class_weight: Literal["balanced", "balanced_subsample"] | None = None
    random_state: Count = Field(42, ge=0, description="seed of the forest")
    n_jobs: Count = Field(1, ge=-1, description="-1: all cores")
    dask_scheduler: Text | None = Field(
        None, description="a dask.distributed scheduler address (tcp://host:port) to fit the trees on; null: local"
    )
    estimator_args: dict[str, Any] = Field(
        default_factory=dict, description="another family's hyperparameters (written flat in the file)"
    )

    @model_validator(mode="before")
    @classmethod
    def _gather_estimator_args(cls, data: Any) -> Any:
        # Another family's own keys (C, learning_rate, ...) are kept aside; for random_forest an
        # unknown key stays where it is and is refused by name, as before families existed.
        if not isinstance(data, Mapping) or data.get("family", "random_forest") == "random_forest":
            return data
        if data.get("family") not in ESTIMATOR_FAMILIES or ESTIMATOR_ARGS in data:
            return data
        known = set(cls.model_fields) - {ESTIMATOR_ARGS}
        gathered = {key: value for key, value in data.items() if key not in known}
        return {**{key: value for key, value in data.items() if key in known}, ESTIMATOR_ARGS: gathered}

    @field_validator("n_jobs")
    @classmethod
    def _not_zero(cls, value: int) -> int:
        if value == 0:
            raise ValueError("0 is not allowed (use -1 for all cores, or a positive count)")
        return value

    @model_validator(mode="after")
    def _dask_fits_trees(self) -> ModelParams:
        if self.dask_scheduler is not None and self.family not in DASK_FAMILIES:
            raise ValueError(
                f"dask_scheduler fits the trees of {' or '.join(DASK_FAMILIES)}; family {self.family} "
                "is fitted locally: set dask_scheduler to null"
            )
        return self

    @model_serializer(mode="wrap")
    def _flat(self, handler: Any) -> dict[str, Any]:
        # As the file is written: another family's keys flat beside family, and of the typed keys
        # only the ones the file gave (a forest's defaults mean nothing to logistic regression).
        data = handler(self)
        gathered = data.pop(ESTIMATOR_ARGS, {})
        if self.family == "random_forest":
            return data
        given = self.model_fields_set | {"family", "dask_scheduler"}
        return {**{key: value for key, value in data.items() if key in given}, **gathered}

    def hyperparameters(self) -> dict[str, Any]:
        """The estimator's own hyperparameters (not family, not where it is fitted)."""
        return self.model_dump(exclude={"family", "dask_scheduler"})


class ValidationParams(_Section):
    min_rows_per_class: Count = Field(10, ge=2, description="fewest rows a class may have and still be split")
    outlier_iqr_factor: float = Field(1.5, gt=0, description="beyond Q1/Q3 -/+ factor x IQR is an outlier")
    max_outlier_share: float = Field(0.05, ge=0, le=1, description="share of outlier rows that warns")
    drift_p_value: float = Field(0.01, gt=0, le=1, description="KS-test p-value below which a feature drifted")
    drift_reference_rows: Count = Field(5000, ge=10, description="training rows kept with a release")
    mislabel_p_value: float = Field(
        0.001, gt=0, le=1, description="labels_agree_with_production check: a binomial p-value below this blocks"
    )


class EvaluationParams(_Section):
    min_accuracy: float = Field(0.80, ge=0, le=1, description="the release gate")
    max_regression: float = Field(
        0.02, ge=0, le=1, description="accuracy drop against production, on either set, that refuses a release"
    )
    alpha: float = Field(
        0.05, gt=0, lt=1, description="significance level of McNemar's test against production (one-sided)"
    )


class PathsParams(_Section):
    artifacts_dir: Text = Field("artifacts", description="model, scaler, metrics and plots")
    registry_dir: Text = Field("registry", description="the local model registry")


PublicKey = Annotated[str, Field(pattern=r"^ed25519:[A-Za-z0-9+/]{43}=$")]


class RegistryParams(_Section):
    trusted_keys: list[PublicKey] = Field(
        default_factory=list,
        description="Ed25519 public keys (ed25519:<base64>) whose signatures on a bundle's manifest are trusted",
    )


TOKEN_SCOPES = ("feedback", "predict")  # what a serving token may do (README "Who may write to the server")


class ServingToken(_Section):
    """A bearer token of the serving API, as its SHA-256: the token itself is never stored."""

    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")] = Field(
        description="who holds the token; recorded with every label it sends"
    )
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")] = Field(
        description="the hex SHA-256 of the token (wine-assets serving token new prints it)"
    )
    scopes: list[Literal[TOKEN_SCOPES]] = Field(  # type: ignore[valid-type]
        default_factory=lambda: ["feedback"],
        min_length=1,
        description="feedback: POST /feedback; predict: scoring, when serving.require_auth_for_predictions",
    )


class ServingParams(_Section):
    host: Text = Field("127.0.0.1", description="address wine-assets serve binds to")
    port: Count = Field(8080, ge=1, le=65535, description="port wine-assets serve listens on")
    workers: Count = Field(1, ge=1, le=64, description="uvicorn worker processes")
    reload_interval_seconds: float = Field(
        2.0, gt=0, le=3600, description="how often each worker reads the production alias"
    )
    max_rows: Count = Field(10000, ge=1, description="most rows one request may score (413 above)")
    max_body_bytes: Count = Field(5_000_000, ge=1024, description="largest request body (413 above)")
    log_path: Text | None = Field(
        "serving/predictions.sqlite", description="append-only log of predictions and feedback; null: none"
    )
    routing_header: Text = Field("X-Routing-Key", description="header whose value picks the A/B variant")
    experiment: Text | None = Field(None, description="name of the A/B test; null: production answers everything")
    candidate_version: Count | None = Field(None, ge=1, description="the registry version the A/B test tries")
    candidate_weight: float = Field(0.1, ge=0, le=1, description="share of routing keys sent to the candidate")
    candidate_mode: Literal["split", "shadow"] = Field(
        "split", description="split: the candidate answers its share; shadow: it scores every request, silently"
    )
    min_labelled: Count = Field(30, ge=1, description="labelled predictions per variant before the report decides")
    max_header_bytes: Count = Field(
        16384, ge=1024, le=1 << 20, description="largest request line plus headers, in bytes (431 above)"
    )
    header_timeout_seconds: float = Field(
        10.0, gt=0, le=600, description="a request line and headers must arrive within this (408, then closed)"
    )
    body_timeout_seconds: float = Field(
        30.0, gt=0, le=3600, description="a request body must arrive within this after its headers (else closed)"
    )
    keep_alive_seconds: Count = Field(5, ge=1, le=600, description="an idle connection between requests is closed")
    log_max_age_days: float | None = Field(
        30.0, gt=0, description="log rows older than this are deleted (see README); null: kept however old"
    )
    log_max_bytes: Count | None = Field(
        1_000_000_000, ge=1_000_000, description="the log's data is kept below this many bytes; null: no limit"
    )
    log_prune_interval_seconds: float = Field(
        30.0, gt=0, le=86400, description="how often the age and size limits of the log are enforced"
    )
    log_busy_timeout_seconds: float = Field(
        1.0, gt=0, le=30, description="how long /feedback waits for a locked log before it answers 503"
    )
    pinned_cache_size: Count = Field(4, ge=1, le=64, description="versions pinned in URLs kept loaded per worker")
    pinned_loads_per_minute: Count = Field(
        12, ge=1, le=600, description="loads of pinned versions not in the cache, per worker and minute (429 above)"
    )

    tokens: list[ServingToken] = Field(
        default_factory=list,
        description="bearer tokens as {name, sha256, scopes}; none: /feedback is refused (README Security)",
    )
    require_auth_for_predictions: bool = Field(
        False, description="true: scoring endpoints need a token with the predict scope too"
    )
    allowed_hosts: list[Text] | None = Field(
        None, description="Host header values served (400 otherwise); null: serving.host, localhost, 127.0.0.1"
    )

    @field_validator("tokens")
    @classmethod
    def _tokens_named_once(cls, value: list[ServingToken]) -> list[ServingToken]:
        names = [token.name for token in value]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"token name(s) {', '.join(repeated)} appear more than once")
        hashes = [token.sha256 for token in value]
        if len(set(hashes)) != len(hashes):
            raise ValueError("the same sha256 appears under two names: make a token per holder")
        return value

    @field_validator("allowed_hosts")
    @classmethod
    def _host_patterns(cls, value: list[str] | None) -> list[str] | None:
        # Starlette's TrustedHostMiddleware takes exact names, '*.example.com' and '*' (anything)
        for pattern in value or []:
            if "*" in pattern[1:] or (pattern.startswith("*") and pattern != "*" and not pattern.startswith("*.")):
                raise ValueError(f"{pattern!r}: a wildcard is only allowed as '*.example.com' or '*'")
        return value

    @model_validator(mode="after")
    def _experiment_needs_a_candidate(self) -> ServingParams:
        if (self.experiment is None) != (self.candidate_version is None):
            raise ValueError("experiment and candidate_version go together: set both, or neither")
        return self


CHAMPION_VARIANT = "production"  # the model section, as a variant of the experiments
Name = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")]


def _check_variant(name: str, spec: Any) -> dict[str, Any]:
    """A variant is a mapping: ``family`` and that estimator's own hyperparameters. Their names and
    values are checked by scikit-learn itself, with a trial fit, before any experiment runs
    (``wine_assets.experiments.check_variants``): loading params stays free of scikit-learn."""
    if not isinstance(spec, Mapping):
        raise ValueError(f"variant {name!r} must be a mapping with a family and its hyperparameters")
    family = spec.get("family")
    if family not in ESTIMATOR_FAMILIES:
        raise ValueError(f"variant {name!r}: family = {family!r} is not one of {', '.join(ESTIMATOR_FAMILIES)}")
    bad_keys = [repr(key) for key in spec if not isinstance(key, str)]
    if bad_keys:
        raise ValueError(f"variant {name!r}: hyperparameter names must be text, not {', '.join(bad_keys)}")
    return {"family": family, **{key: value for key, value in spec.items() if key != "family"}}


DEFAULT_VARIANTS: dict[str, dict[str, Any]] = {
    "extra_trees": {"family": "extra_trees", "n_estimators": 200, "random_state": 42},
    "gradient_boosting": {"family": "gradient_boosting", "n_estimators": 100, "random_state": 42},
    "logistic_regression": {"family": "logistic_regression", "C": 1.0, "max_iter": 1000},
}


class ExperimentsParams(_Section):
    datasets: dict[Name, Text] = Field(
        default_factory=lambda: {"wine": BUILTIN_SOURCE},
        description="name: 'builtin' or a CSV path; one partition per dataset",
    )
    variants: dict[Name, Any] = Field(
        default_factory=lambda: {name: dict(spec) for name, spec in DEFAULT_VARIANTS.items()},
        description="name: {family, hyperparameters}; 'production' is the model section",
    )
    folds: Count = Field(5, ge=2, le=20, description="k of the repeated stratified k-fold")
    repeats: Count = Field(5, ge=1, le=50, description="how many times the k folds are drawn again")
    seed: Count = Field(42, ge=0, description="seed of the folds, the same for every variant")
    alpha: float = Field(0.05, gt=0, lt=1, description="significance level of the decision (Holm-corrected)")
    min_improvement: float = Field(0.0, ge=0, lt=1, description="accuracy a challenger must gain to count")
    release_as: Literal["production", "candidate"] = Field(
        "production", description="a released winner becomes production, or only a version for A/B serving"
    )
    mlflow_tracking_uri: Text | None = Field(None, description="log experiments to MLflow here (needs the extra)")

    @field_validator("datasets")
    @classmethod
    def _some_datasets(cls, value: dict[str, str]) -> dict[str, str]:
        if not value:
            raise ValueError("name at least one dataset")
        return value

    @field_validator("mlflow_tracking_uri")
    @classmethod
    def _local_store(cls, value: str | None) -> str | None:
        # a tracking server would mean network traffic at run time: only local stores
        if value is not None and "://" in value and not value.startswith(("file://", "sqlite:///")):
            raise ValueError("is not allowed: only a local store (a folder, file:///folder or sqlite:///file)")
        if value is not None and value.startswith("file:") and not value.startswith("file://"):
            raise ValueError("is not allowed: write file:///folder, or just the folder")
        return value

    @field_validator("variants", mode="before")
    @classmethod
    def _variants(cls, value: Any) -> Any:
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            raise ValueError("must be a mapping of variant names to {family, hyperparameters}")
        if CHAMPION_VARIANT in value:
            raise ValueError(f"'{CHAMPION_VARIANT}' is the model section; give the variant another name")
        return {name: _check_variant(str(name), spec) for name, spec in value.items()}


class _Document(_Section):
    """A whole params file: every section optional, nothing else allowed."""

    data: DataParams = DataParams()
    model: ModelParams = ModelParams()
    validation: ValidationParams = ValidationParams()
    evaluation: EvaluationParams = EvaluationParams()
    paths: PathsParams = PathsParams()
    registry: RegistryParams = RegistryParams()
    serving: ServingParams = ServingParams()
    experiments: ExperimentsParams = ExperimentsParams()


SECTIONS: dict[str, type[_Section]] = {
    name: info.annotation  # type: ignore[misc]
    for name, info in _Document.model_fields.items()
}


@dataclass(frozen=True)
class Params:
    """Validated parameters plus the folder that relative paths resolve against."""

    data: DataParams = field(default_factory=DataParams)
    model: ModelParams = field(default_factory=ModelParams)
    validation: ValidationParams = field(default_factory=ValidationParams)
    evaluation: EvaluationParams = field(default_factory=EvaluationParams)
    paths: PathsParams = field(default_factory=PathsParams)
    registry: RegistryParams = field(default_factory=RegistryParams)
    serving: ServingParams = field(default_factory=ServingParams)
    experiments: ExperimentsParams = field(default_factory=ExperimentsParams)
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

    def dataset_source_path(self, name: str) -> Path | None:
        """An experiment dataset's CSV as an absolute path, or None for the built-in data set."""
        source = self.experiments.datasets[name]
        return None if source == BUILTIN_SOURCE else self.resolve(source)

    @property
    def serving_log_path(self) -> Path | None:
        return None if self.serving.log_path is None else self.resolve(self.serving.log_path)

    @property
    def watch_dir(self) -> Path | None:
        return None if self.data.watch_dir is None else self.resolve(self.data.watch_dir)

    @property
    def origin(self) -> str:
        return str(self.source_file) if self.source_file else "built-in defaults"

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """The parameters as plain YAML-ready data, paths as written (not resolved)."""
        return {name: getattr(self, name).model_dump() for name in SECTIONS}


# -- turning pydantic's errors into messages that name the file, the key and what is allowed --
def describe_allowed(info: FieldInfo) -> str:
    """What a field accepts, from its own constraints: '0 < value < 1', "one of 'a', 'b' or null"."""
    low = high = ""
    for item in info.metadata:
        if isinstance(item, annotated_types.Gt):
            low = f"{item.gt} < "
        elif isinstance(item, annotated_types.Ge):
            low = f"{item.ge} <= "
        elif isinstance(item, annotated_types.Lt):
            high = f" < {item.lt}"
        elif isinstance(item, annotated_types.Le):
            high = f" <= {item.le}"
    nullable = type(None) in get_args(info.annotation)
    annotation = info.annotation
    if get_origin(annotation) is Literal:  # its arguments are the choices, not member types
        members = [annotation]
    else:
        members = [arg for arg in get_args(annotation) if arg is not type(None)] or [annotation]
    choices: list[Any] = []
    kinds: list[Any] = []
    for member in members:
        if get_origin(member) is Literal:
            choices.extend(get_args(member))
        else:
            kinds.append(get_args(member)[0] if get_origin(member) is Annotated else member)
    parts = []
    if low or high:
        parts.append(f"{low}value{high}")
    if choices:
        parts.append("one of " + ", ".join(repr(choice) for choice in choices))
    if not parts:
        parts.append(" or ".join(_KIND_NAMES.get(kind, getattr(kind, "__name__", str(kind))) for kind in kinds))
    if nullable:
        parts.append("or null")
    return " ".join(parts)


_KIND_NAMES = {int: "a whole number", float: "a number", str: "a non-empty text"}
_REASONS = {
    "greater_than": "is out of range",
    "greater_than_equal": "is out of range",
    "less_than": "is out of range",
    "less_than_equal": "is out of range",
    "literal_error": "is not an allowed choice",
    "finite_number": "is not a finite number",
    "string_pattern_mismatch": "is not a non-empty text",
}


def _reason(error: Mapping[str, Any]) -> str:
    value, code = error["input"], error["type"]
    if code in _REASONS:
        return _REASONS[code]
    if code == "value_error":  # a field validator's own words
        return str(error["ctx"]["error"])
    if value is None:
        return "must not be null"
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return "has the wrong type"
    if code.startswith("int"):
        return "is not a whole number"
    if code.startswith("float"):
        return "is not a number"
    if code.startswith("string"):
        return "is not a non-empty text"
    return error["msg"].lower()


def _message(where: str, error: Mapping[str, Any]) -> str:
    location = [str(part) for part in error["loc"]]
    # invalid_key: a key that is not text (YAML reads 1, yes, on as numbers and flags); its
    # location says 1 for True, the input says what was written.
    unknown = error["type"] in ("extra_forbidden", "invalid_key")
    if error["type"] == "invalid_key":
        location[-1] = str(error["input"])
    if len(location) == 1:
        if error["type"] == "value_error":  # a rule across keys of one section
            return f"{where}: section '{location[0]}': {error['ctx']['error']}"
        if unknown:
            return f"{where}: unknown section '{location[0]}'; the sections are: {', '.join(SECTIONS)}"
        return f"{where}: section '{location[0]}' must be a mapping of keys to values"
    section, key = location[0], location[1]
    fields = SECTIONS[section].model_fields
    if unknown:
        keys = ", ".join(name for name in fields if name != ESTIMATOR_ARGS)
        return f"{where}: unknown key {section}.{key}; the keys of '{section}' are: {keys}"
    if len(location) > 2:  # inside a mapping (experiments.datasets.NAME ...)
        dotted = ".".join(location)
        if error["type"] == "value_error":
            return f"{where}: {section}.{key}: {error['ctx']['error']}"
        if error["type"] == "string_pattern_mismatch" and location[-1] == "[key]":
            return (
                f"{where}: {section}.{key}: name {error['input']!r} may hold only letters, digits, _ . - "
                "(64 at most, starting with a letter or digit)"
            )
        return f"{where}: {dotted} = {error['input']!r} {_reason(error)}"
    info = fields[key]
    if get_origin(info.annotation) is dict:
        if error["type"] == "value_error":
            return f"{where}: {section}.{key}: {error['ctx']['error']}"
        return f"{where}: {section}.{key} = {error['input']!r} is not a mapping of names to values"
    return f"{where}: {section}.{key} = {error['input']!r} {_reason(error)}; allowed: {describe_allowed(info)}"


def params_from_mapping(
    raw: Any, *, where: str = "params", base_dir: Path | None = None, source_file: Path | None = None
) -> Params:
    """Validate a parsed params document (a mapping of sections) into Params."""
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ParamsError(f"{where}: the top level must be a mapping of sections ({', '.join(SECTIONS)})")
    # An empty section ("model:" with nothing under it) means that section's defaults.
    document = {name: ({} if value is None and name in SECTIONS else value) for name, value in raw.items()}
    try:
        validated = _Document.model_validate(document)
    except ValidationError as exc:
        # One line per problem, in the file's order: a user fixes them all in one go.
        raise ParamsError("\n".join(_message(where, error) for error in exc.errors())) from None
    return Params(
        **{name: getattr(validated, name) for name in SECTIONS},
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
        value = load_yaml(text, f"override {item!r}: the value") if text.strip() else None
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
    hint = f" (set by {PARAMS_ENV_VAR})" if not path and os.environ.get(PARAMS_ENV_VAR) else ""
    return read_params(params_file, overrides, base_dir=None, hint=hint)


# -- the params a run was launched with, carried to every step as run tags --
LAUNCH_FILE_TAG = "wine_assets/params_file"
LAUNCH_BASE_DIR_TAG = "wine_assets/params_base_dir"
NO_PARAMS_FILE = "none (built-in defaults)"


@dataclass(frozen=True)
class LaunchParams:
    """Where a run's params come from, fixed when the run starts, so a step executed by a worker
    in another folder (or on another machine with the same shared storage) reads the same file
    and resolves relative paths against the same folder."""

    params_file: Path | None
    base_dir: Path

    @classmethod
    def resolve(cls, explicit: str | os.PathLike[str] | None = None) -> LaunchParams:
        """Resolve in this (the launching) process: an explicit path, $WINE_ASSETS_PARAMS, ./params.yaml."""
        params_file = find_params_file(explicit)
        return cls(params_file, params_file.parent if params_file else Path.cwd().resolve())

    def to_tags(self) -> dict[str, str]:
        return {
            LAUNCH_FILE_TAG: str(self.params_file) if self.params_file else NO_PARAMS_FILE,
            LAUNCH_BASE_DIR_TAG: str(self.base_dir),
        }

    @classmethod
    def from_tags(cls, tags: Mapping[str, str]) -> LaunchParams | None:
        """The launch params a run carries, or None for a run that carries none."""
        if LAUNCH_FILE_TAG not in tags:
            return None
        file_tag, base_tag = tags[LAUNCH_FILE_TAG], tags.get(LAUNCH_BASE_DIR_TAG, "")
        for name, value in ((LAUNCH_FILE_TAG, file_tag), (LAUNCH_BASE_DIR_TAG, base_tag)):
            if value != NO_PARAMS_FILE and not Path(value).is_absolute():
                raise ParamsError(f"run tag {name} = {value!r} is not an absolute path")
        return cls(None if file_tag == NO_PARAMS_FILE else Path(file_tag), Path(base_tag))

    def load(self, overrides: Sequence[str] = ()) -> Params:
        """Read exactly this file (never a fallback): a missing file is an error naming it."""
        hint = " (the file this run was launched with)"
        return read_params(self.params_file, overrides, base_dir=self.base_dir, hint=hint)


def read_params(
    params_file: Path | None, overrides: Sequence[str] = (), *, base_dir: Path | None = None, hint: str = ""
) -> Params:
    """Read and validate one params file, or the built-in defaults when it is None; relative paths
    resolve against base_dir (default: the file's folder, or the current directory for defaults)."""
    if params_file is None:
        raw: Any = {}
        where = "built-in defaults"
        base_dir = base_dir or Path.cwd()
    else:
        where = str(params_file)
        base_dir = base_dir or params_file.parent
        try:
            text = params_file.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ParamsError(f"params file not found: {params_file}{hint}") from None
        except OSError as exc:
            raise ParamsError(f"params file {params_file} cannot be read: {exc.strerror}") from exc
        raw = load_yaml(text, str(params_file))
    if overrides:
        if raw is not None and not isinstance(raw, Mapping):
            raise ParamsError(f"{where}: the top level must be a mapping of sections")
        raw = apply_overrides(raw or {}, overrides, where)
    return params_from_mapping(raw, where=where, base_dir=base_dir, source_file=params_file)


def params_to_yaml(params: Params) -> str:
    """The parameters as YAML text, as stored beside a released model."""
    return yaml.safe_dump(params.to_dict(), sort_keys=False)


# -- writing the model section back: releasing an experiment's winner makes it the configuration --
@dataclass(frozen=True)
class ParamsChange:
    """A params file before and after a change, with the unified diff between them."""

    path: Path
    before: str
    after: str

    @property
    def diff(self) -> str:
        import difflib

        lines = difflib.unified_diff(
            self.before.splitlines(keepends=True), self.after.splitlines(keepends=True), str(self.path), str(self.path)
        )
        return "".join(lines)

    @property
    def changed(self) -> bool:
        return self.before != self.after


def model_section_change(path: Path, family: str, hyperparameters: Mapping[str, Any]) -> ParamsChange:
    """The params file with its ``model`` section naming ``family`` and exactly ``hyperparameters``.

    A round-trip YAML edit (ruamel.yaml): the other sections, every comment and the layout stay as
    they are; a kept key keeps its comment. The result is validated before it is returned.
    """
    from ruamel.yaml import YAML
    from ruamel.yaml.comments import CommentedMap

    try:
        before = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ParamsError(f"params file {path} cannot be read: {exc.strerror}") from exc
    yaml_rt = YAML()  # round-trip: comments, order and quoting kept
    yaml_rt.preserve_quotes = True
    yaml_rt.width = 4096  # never re-wrap a long comment or value
    yaml_rt.representer.add_representer(  # null as this project writes it, not an empty value
        type(None), lambda representer, _: representer.represent_scalar("tag:yaml.org,2002:null", "null")
    )
    # ruamel builds its objects as it reads: the same checks (aliases counted) come first.
    load_yaml(before, str(path))
    try:
        document = yaml_rt.load(before)
    except Exception as exc:  # ruamel raises several error types; all mean the same here
        raise ParamsError(f"{path}: not valid YAML: {exc}") from exc
    if document is None:
        document = CommentedMap()
    if not isinstance(document, Mapping):
        raise ParamsError(f"{path}: the top level must be a mapping of sections")
    section = document.get("model")
    if not isinstance(section, CommentedMap):
        section = CommentedMap()
        document["model"] = section
    wanted = {"family": family, **dict(hyperparameters)}
    if "dask_scheduler" in section:
        wanted["dask_scheduler"] = section["dask_scheduler"] if family in DASK_FAMILIES else None
    for key in [key for key in section if key not in wanted]:
        del section[key]
    for position, (key, value) in enumerate(wanted.items()):
        if key in section:
            section[key] = value
        else:
            section.insert(min(position, len(section)), key, value)
    buffer = io.StringIO()
    yaml_rt.dump(document, buffer)
    after = buffer.getvalue()
    where = f"{path} (with the new model section)"
    params_from_mapping(load_yaml(after, where), where=where)
    return ParamsChange(path, before, after)


def write_params_change(change: ParamsChange) -> None:
    """Write the changed params file atomically (the old file stays whole until the rename)."""
    from wine_assets.files import write_bytes_atomic

    write_bytes_atomic(change.path, change.after.encode("utf-8"))
