"""``wine-assets serving report``: online accuracy per variant, with intervals and a test.

Reads the prediction log (predictions joined with their feedback) of one A/B experiment:

* per variant: predictions, labelled predictions, accuracy with a 95% Wilson interval;
* ``split`` mode (different requests per variant): Fisher's exact test on the 2x2 table of
  correct/wrong by variant, the two-proportion z-test beside it, and the difference in
  accuracy with a 95% Wald interval;
* ``shadow`` mode (both variants scored every request): agreement between them with its
  interval and, on the labelled rows, McNemar's exact test on the discordant pairs (the
  paired test: the same requests were scored by both).

Below ``min_labelled`` labelled predictions per variant the report says plainly that there
is not enough to decide, whatever the p-value.
"""

from __future__ import annotations

import math
import sqlite3
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from scipy import stats

Z95 = 1.959963984540054


class ReportError(Exception):
    """The log cannot be read or holds nothing to report."""


@dataclass(frozen=True)
class VariantSummary:
    variant: str
    versions: list[int]
    predictions: int
    labelled: int
    correct: int
    accuracy: float | None
    interval: tuple[float, float] | None


@dataclass
class ServingReport:
    experiment: str | None
    mode: str
    variants: list[VariantSummary]
    comparison: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    decision: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def wilson_interval(successes: int, trials: int, z: float = Z95) -> tuple[float, float] | None:
    if trials == 0:
        return None
    share = successes / trials
    denominator = 1 + z * z / trials
    centre = (share + z * z / (2 * trials)) / denominator
    half = z * math.sqrt(share * (1 - share) / trials + z * z / (4 * trials * trials)) / denominator
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == trials else min(1.0, centre + half)
    return low, high


def two_proportion_test(correct_a: int, n_a: int, correct_b: int, n_b: int) -> dict[str, float]:
    """Pooled two-sided z-test and the 95% Wald interval of the difference a - b."""
    share_a, share_b = correct_a / n_a, correct_b / n_b
    pooled = (correct_a + correct_b) / (n_a + n_b)
    spread = math.sqrt(pooled * (1 - pooled) * (1 / n_a + 1 / n_b))
    z = 0.0 if spread == 0 else (share_a - share_b) / spread
    p_value = 1.0 if spread == 0 else float(2 * stats.norm.sf(abs(z)))
    wald = math.sqrt(share_a * (1 - share_a) / n_a + share_b * (1 - share_b) / n_b)
    difference = share_a - share_b
    return {
        "difference": difference,
        "z": z,
        "p_value": p_value,
        "interval_low": difference - Z95 * wald,
        "interval_high": difference + Z95 * wald,
    }


def read_rows(path: Path, experiment: str | None) -> list[tuple]:
    if not path.is_file():
        raise ReportError(f"no prediction log at {path}: start wine-assets serve (serving.log_path) and send requests")
    try:
        connection = _read_only(path)
        try:
            where, args = ("WHERE p.experiment = ?", (experiment,)) if experiment else ("", ())
            return connection.execute(
                "SELECT p.variant, p.model_version, p.predicted_class, p.shadow_version, p.shadow_class, f.true_class "
                f"FROM predictions p LEFT JOIN feedback f ON f.prediction_id = p.prediction_id {where}",
                args,
            ).fetchall()
        finally:
            connection.close()
    except sqlite3.DatabaseError as exc:
        raise ReportError(f"{path} is not a readable prediction log: {exc}") from None


def latest_experiment(path: Path) -> str | None:
    if not path.is_file():
        return None
    try:
        connection = _read_only(path)
    except sqlite3.DatabaseError:
        return None
    try:
        found = connection.execute(
            "SELECT experiment FROM predictions WHERE experiment IS NOT NULL ORDER BY created DESC LIMIT 1"
        ).fetchone()
    except sqlite3.DatabaseError:
        return None
    finally:
        connection.close()
    return None if found is None else found[0]


def _read_only(path: Path) -> sqlite3.Connection:
    # A URI, for mode=ro: the path is percent-quoted, so '#', '?' and '%' in a folder name stay the path.
    return sqlite3.connect(f"file:{quote(str(path))}?mode=ro", uri=True, timeout=10)


def _summary(variant: str, rows: list[tuple[int, int, int | None]]) -> VariantSummary:
    """rows: (version, predicted class, true class or None)."""
    labelled = [(predicted, true) for _, predicted, true in rows if true is not None]
    correct = sum(1 for predicted, true in labelled if predicted == true)
    return VariantSummary(
        variant=variant,
        versions=sorted({version for version, _, _ in rows}),
        predictions=len(rows),
        labelled=len(labelled),
        correct=correct,
        accuracy=correct / len(labelled) if labelled else None,
        interval=wilson_interval(correct, len(labelled)),
    )


def build_report(rows: list[tuple], experiment: str | None, min_labelled: int, alpha: float = 0.05) -> ServingReport:
    """The report over log rows (variant, version, predicted, shadow version, shadow class, true class)."""
    if not rows:
        raise ReportError(f"the log has no predictions{' for experiment ' + repr(experiment) if experiment else ''}")
    by_variant: dict[str, list[tuple[int, int, int | None]]] = {}
    shadow_rows = []
    for variant, version, predicted, shadow_version, shadow_class, true in rows:
        by_variant.setdefault(variant, []).append((version, predicted, true))
        if shadow_class is not None:
            shadow_rows.append((version, predicted, shadow_version, shadow_class, true))
    mode = "shadow" if shadow_rows else ("split" if "candidate" in by_variant else "none")
    variants = [_summary(name, by_variant[name]) for name in sorted(by_variant)]
    if shadow_rows:
        # Shadow compares the two on the same requests: production counted on the rows the shadow scored too.
        variants = [summary for summary in variants if summary.variant != "production"]
        variants.append(_summary("production", [(v, p, true) for v, p, _, _, true in shadow_rows]))
        variants.append(_summary("shadow", [(sv, sc, true) for _, _, sv, sc, true in shadow_rows]))
    report = ServingReport(experiment, mode, variants)
    named = {summary.variant: summary for summary in variants}
    production = named.get("production")
    challenger = named.get("candidate") or named.get("shadow")
    if production is None or challenger is None:
        report.decision = "no comparison: only one variant has predictions"
        return report
    short = [s for s in (production, challenger) if s.labelled < min_labelled]
    if short:
        report.warnings.append(
            "too few labelled predictions to decide: "
            + ", ".join(f"{s.variant} has {s.labelled}" for s in (production, challenger))
            + f" (serving.min_labelled is {min_labelled} per variant); send more feedback"
        )
    if mode == "split":
        if production.labelled and challenger.labelled:
            table = [
                [challenger.correct, challenger.labelled - challenger.correct],
                [production.correct, production.labelled - production.correct],
            ]
            _, fisher_p = stats.fisher_exact(table)
            report.comparison = {
                "test": "Fisher's exact test (two-sided), two-proportion z-test beside it",
                "fisher_p_value": float(fisher_p),
                **two_proportion_test(challenger.correct, challenger.labelled, production.correct, production.labelled),
            }
            p_value = float(fisher_p)
        else:
            p_value = None
    else:
        agree = sum(1 for _, predicted, _, shadow_class, _ in shadow_rows if predicted == shadow_class)
        labelled = [
            (predicted, shadow_class, true) for _, predicted, _, shadow_class, true in shadow_rows if true is not None
        ]
        only_shadow = sum(1 for p, s, t in labelled if s == t and p != t)
        only_production = sum(1 for p, s, t in labelled if p == t and s != t)
        discordant = only_shadow + only_production
        p_value = (
            float(stats.binomtest(only_shadow, discordant, 0.5).pvalue) if discordant else (1.0 if labelled else None)
        )
        report.comparison = {
            "test": "McNemar's exact test on the labelled requests both variants scored",
            "agreement": agree / len(shadow_rows),
            "agreement_interval": wilson_interval(agree, len(shadow_rows)),
            "only_shadow_correct": only_shadow,
            "only_production_correct": only_production,
            "mcnemar_p_value": p_value,
            "difference": (only_shadow - only_production) / len(labelled) if labelled else None,
        }
    if p_value is None:
        report.decision = "no decision: no labelled predictions yet"
    elif short:
        report.decision = "no decision: too few labelled predictions"
    elif p_value >= alpha:
        report.decision = f"no significant difference (p = {p_value:.3g} >= {alpha}): keep production"
    elif (
        report.comparison["only_shadow_correct"] > report.comparison["only_production_correct"]
        if mode == "shadow"
        else (challenger.accuracy or 0) > (production.accuracy or 0)
    ):
        report.decision = f"the candidate is more accurate (p = {p_value:.3g} < {alpha})"
    else:
        report.decision = f"the candidate is less accurate (p = {p_value:.3g} < {alpha}): keep production"
    return report


def format_report(report: ServingReport) -> str:
    def share(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f}"

    experiment = report.experiment or "(none named: every prediction in the log, pinned versions included)"
    lines = [f"experiment: {experiment}    mode: {report.mode}", ""]
    header = ("variant", "versions", "predictions", "labelled", "accuracy", "95% interval")
    rows = [header] + [
        (
            s.variant,
            ",".join(f"v{v}" for v in s.versions),
            str(s.predictions),
            str(s.labelled),
            share(s.accuracy),
            "-" if s.interval is None else f"[{s.interval[0]:.3f}, {s.interval[1]:.3f}]",
        )
        for s in report.variants
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines += ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows]
    if report.comparison:
        lines.append("")
        lines.append(f"test: {report.comparison['test']}")
        for key, value in report.comparison.items():
            if key != "test":
                shown = f"{value:.4g}" if isinstance(value, float) else str(value)
                lines.append(f"  {key}: {shown}")
    for warning in report.warnings:
        lines.append(f"\nWARNING: {warning}")
    lines.append(f"\ndecision: {report.decision}")
    return "\n".join(lines) + "\n"
