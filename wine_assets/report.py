"""The pull-request report: metrics against a baseline, the params that changed, every asset
check, the plots, and where the data came from. Markdown, as ``dvc metrics diff --md`` writes it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wine_assets.params import ParamsError, load_yaml
from wine_assets.registry import METRICS_FILE, PARAMS_FILE, ModelRegistry, RegistryError

PRODUCTION = "production"
PLOTS = (("Confusion matrix", "plots/confusion_matrix.png"), ("Feature importance", "plots/feature_importance.png"))


class ReportError(ValueError):
    """The report cannot be made; the message names the missing or broken file."""


@dataclass(frozen=True)
class Baseline:
    label: str
    metrics: dict[str, Any]
    params: dict[str, Any] | None


@dataclass(frozen=True)
class CheckRow:
    asset: str
    check: str
    status: str  # pass, fail, warn, not run
    run_id: str | None


def read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ReportError(f"{what} not found: {path}") from None
    except json.JSONDecodeError as exc:
        raise ReportError(f"{what} {path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ReportError(f"{what} {path} is not a JSON object of metrics")
    return data


def load_baseline(spec: str, registry: ModelRegistry | Path) -> Baseline | None:
    """``production`` (the registry's production model, None when nothing is released) or a metrics.json path."""
    if spec == PRODUCTION:
        if not isinstance(registry, ModelRegistry):
            registry = ModelRegistry(registry)
        version = registry.production_version()
        if version is None:
            return None
        try:
            metrics = json.loads(registry.read_file(version, METRICS_FILE))
            params = load_yaml(registry.read_file(version, PARAMS_FILE).decode("utf-8"), f"v{version}/{PARAMS_FILE}")
        except (RegistryError, ParamsError, UnicodeDecodeError) as exc:
            raise ReportError(f"the production model v{version} cannot serve as baseline: {exc}") from exc
        return Baseline(f"production v{version}", metrics, params)
    path = Path(spec)
    metrics = read_json(path, "baseline metrics")
    params = metrics.get("params")
    beside = path.parent / "params.yaml"
    if params is None and beside.is_file():
        try:
            params = load_yaml(beside.read_text(encoding="utf-8"), str(beside))
        except (ParamsError, UnicodeDecodeError) as exc:
            raise ReportError(f"the baseline's params {beside} cannot be read: {exc}") from exc
    return Baseline(str(path), metrics, params)


def _flatten(document: Mapping[str, Any] | None, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in (document or {}).items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


ABSENT = object()  # a key one side does not have (null is a value, not an absence)


def params_diff(current: Mapping[str, Any] | None, baseline: Mapping[str, Any] | None) -> list[tuple[str, Any, Any]]:
    """(key, baseline value, current value) for every key whose value differs, sorted by key.

    A key missing on one side is given as ``ABSENT`` there.
    """
    old, new = _flatten(baseline), _flatten(current)
    changed = []
    for key in sorted(set(old) | set(new)):
        before, after = old.get(key, ABSENT), new.get(key, ABSENT)
        if before != after:
            changed.append((key, before, after))
    return changed


def _number(value: Any) -> str:
    return "-" if value is None else f"{value:.4f}"


def metrics_table(current: Mapping[str, Any], baseline: Baseline | None) -> list[str]:
    # Imported here: wine_assets.evaluation brings scikit-learn and matplotlib, which
    # `wine-assets summary` (reading metrics.json through this module) does not need.
    from wine_assets.evaluation import HEADLINE_METRICS

    if baseline is None:
        lines = ["| Metric | Value |", "|---|---|"]
        lines += [f"| {name} | {_number(current.get(name))} |" for name in HEADLINE_METRICS]
        return lines
    lines = ["| Metric | Baseline | Current | Change |", "|---|---|---|---|"]
    for name in HEADLINE_METRICS:
        old, new = baseline.metrics.get(name), current.get(name)
        change = "-" if old is None or new is None else f"{new - old:+.4f}"
        lines.append(f"| {name} | {_number(old)} | {_number(new)} | {change} |")
    return lines


def _cell(value: Any) -> str:
    if value is ABSENT:
        return "(absent)"
    return "`null`" if value is None else f"`{value}`"


def render(
    current: Mapping[str, Any],
    baseline: Baseline | None,
    current_params: Mapping[str, Any] | None,
    checks: Sequence[CheckRow] | None,
    plots: Sequence[tuple[str, str]],
) -> str:
    """The report as markdown; ``plots`` are (title, path relative to the report) pairs."""
    out = ["# Wine classifier: pipeline report", ""]
    if baseline is None:
        out += ["No baseline: nothing in production and no baseline metrics given, so the values stand alone.", ""]
    else:
        out += [f"Compared with **{baseline.label}**.", ""]
    out += ["## Metrics (test set)", "", *metrics_table(current, baseline), ""]

    out += ["## Params", ""]
    if baseline is None:
        out += ["No baseline to compare params with.", ""]
    elif baseline.params is None:
        out += ["The baseline does not record its params.", ""]
    else:
        changed = params_diff(current_params, baseline.params)
        if changed:
            out += ["| Param | Baseline | Current |", "|---|---|---|"]
            out += [f"| {key} | {_cell(old)} | {_cell(new)} |" for key, old, new in changed]
        else:
            out += ["No params changed."]
        out += [""]

    out += ["## Asset checks", ""]
    if checks is None:
        out += ["No Dagster run history available (DAGSTER_HOME not set), so no check results.", ""]
    else:
        out += ["| Asset | Check | Result | Run |", "|---|---|---|---|"]
        out += [
            f"| {row.asset} | {row.check} | {row.status} | {row.run_id[:8] if row.run_id else '-'} |" for row in checks
        ]
        out += [""]

    data = current.get("data", {})
    out += [
        "## Data",
        "",
        f"- source: `{data.get('source')}`",
        f"- fingerprint (sha256): `{data.get('fingerprint')}`",
        f"- rows: {data.get('train_rows')} train, {data.get('test_rows')} test",
        "",
    ]
    if plots:
        out += ["## Plots", ""]
        out += [f"![{title}]({path})\n" for title, path in plots]
    return "\n".join(out).rstrip() + "\n"


def plot_links(artifacts_dir: Path, report_dir: Path) -> list[tuple[str, str]]:
    """The plots that exist, as paths relative to the report's folder (CML uploads them)."""
    links = []
    for title, name in PLOTS:
        path = artifacts_dir / name
        if path.is_file():
            links.append((title, Path(os.path.relpath(path, report_dir)).as_posix()))
    return links
