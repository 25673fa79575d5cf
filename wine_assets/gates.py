"""Model-quality gates as plain functions: the accuracy threshold, the challenge of a release
against production on the same rows, and new labels against the trusted model."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats


@dataclass(frozen=True)
class AccuracyGate:
    accuracy: float
    threshold: float

    @property
    def margin(self) -> float:
        return float(self.accuracy - self.threshold)

    @property
    def passed(self) -> bool:
        return bool(self.accuracy >= self.threshold)

    @property
    def message(self) -> str:
        verdict = "passes" if self.passed else "fails"
        return (
            f"test accuracy {self.accuracy:.4f} {verdict} the gate evaluation.min_accuracy = "
            f"{self.threshold:.4f} (margin {self.margin:+.4f})"
        )


def accuracy_gate(accuracy: float, threshold: float) -> AccuracyGate:
    return AccuracyGate(float(accuracy), float(threshold))


# -- a release is a challenger to production: both models on the same rows --------------------
def mcnemar_worse_p(candidate_only_wrong: int, production_only_wrong: int) -> float:
    """McNemar's exact test, one-sided: the p-value of "the candidate errs more often than production".

    Only the rows where exactly one model is right carry information; under "equally good" each
    such row is the candidate's error with probability 1/2 (a binomial test on the discordant pairs).
    """
    discordant = candidate_only_wrong + production_only_wrong
    if discordant == 0:
        return 1.0
    return float(stats.binomtest(candidate_only_wrong, discordant, 0.5, alternative="greater").pvalue)


@dataclass(frozen=True)
class PairedComparison:
    """Candidate and production scored on the same labelled rows."""

    rows_name: str  # "test set" or "evaluation set"
    rows: int
    candidate_accuracy: float
    production_accuracy: float
    candidate_only_wrong: int  # rows production gets right and the candidate wrong
    production_only_wrong: int  # rows the candidate gets right and production wrong
    p_value: float  # McNemar's exact test, one-sided (candidate worse)

    @property
    def change(self) -> float:
        return float(self.candidate_accuracy - self.production_accuracy)

    def problems(self, alpha: float, max_regression: float) -> list[str]:
        found = []
        if self.p_value < alpha:
            found.append(
                f"significantly worse on the {self.rows_name} (McNemar exact p = {self.p_value:.3g} < "
                f"evaluation.alpha = {alpha:g}: {self.candidate_only_wrong} rows only the candidate gets wrong, "
                f"{self.production_only_wrong} only production)"
            )
        if self.change < -max_regression - 1e-12:
            found.append(
                f"{-self.change:.4f} less accurate on the {self.rows_name} ({self.candidate_accuracy:.4f} vs "
                f"{self.production_accuracy:.4f}), more than evaluation.max_regression = {max_regression:g}"
            )
        return found


def compare_on_rows(
    rows_name: str, labels: np.ndarray, candidate: np.ndarray, production: np.ndarray
) -> PairedComparison:
    """Pair the two models' predictions row by row against the labels."""
    labels, candidate, production = (np.asarray(values) for values in (labels, candidate, production))
    if not len(labels) == len(candidate) == len(production) or len(labels) == 0:
        raise ValueError(f"the {rows_name} needs the same, non-zero number of labels and predictions per model")
    candidate_right, production_right = candidate == labels, production == labels
    only_candidate_wrong = int(np.sum(production_right & ~candidate_right))
    only_production_wrong = int(np.sum(candidate_right & ~production_right))
    return PairedComparison(
        rows_name=rows_name,
        rows=int(len(labels)),
        candidate_accuracy=float(candidate_right.mean()),
        production_accuracy=float(production_right.mean()),
        candidate_only_wrong=only_candidate_wrong,
        production_only_wrong=only_production_wrong,
        p_value=mcnemar_worse_p(only_candidate_wrong, only_production_wrong),
    )


@dataclass(frozen=True)
class Challenge:
    """The verdict on a candidate against production: refused when it is significantly worse, or
    worse by more than ``max_regression``, on any of the compared row sets."""

    production_version: int | None
    comparisons: tuple[PairedComparison, ...]
    alpha: float
    max_regression: float
    candidate_version: int | None = None  # an already published version (a move back to it)

    @property
    def problems(self) -> list[str]:
        return [problem for item in self.comparisons for problem in item.problems(self.alpha, self.max_regression)]

    @property
    def passed(self) -> bool:
        return not self.problems

    @property
    def message(self) -> str:
        if self.production_version is None:
            return "no model in production yet: the first release is judged by the accuracy gate alone"
        who = f"v{self.candidate_version}" if self.candidate_version else "the candidate"
        if not self.comparisons:
            return f"{who} was not compared with production v{self.production_version}: there is no evaluation set yet"
        scores = "; ".join(
            f"{item.rows_name} ({item.rows} rows): {who} {item.candidate_accuracy:.4f} vs production "
            f"v{self.production_version} {item.production_accuracy:.4f}, McNemar p = {item.p_value:.3g}"
            for item in self.comparisons
        )
        if self.passed:
            return f"{who} is not worse than production v{self.production_version}: {scores}"
        return f"{who} is refused against production v{self.production_version}: {'; '.join(self.problems)}"

    def rows(self) -> list[dict[str, Any]]:
        """One row per compared set, for a table."""
        return [
            {
                "rows": item.rows_name,
                "n": item.rows,
                "candidate_accuracy": item.candidate_accuracy,
                "production_accuracy": item.production_accuracy,
                "change": item.change,
                "candidate_only_wrong": item.candidate_only_wrong,
                "production_only_wrong": item.production_only_wrong,
                "mcnemar_p": item.p_value,
                "verdict": "worse" if item.problems(self.alpha, self.max_regression) else "not worse",
            }
            for item in self.comparisons
        ]

    def to_dict(self) -> dict[str, Any]:
        """As recorded in a manifest and the alias history."""
        return {
            "production_version": self.production_version,
            "test": "McNemar exact, one-sided (candidate worse)",
            "alpha": self.alpha,
            "max_regression": self.max_regression,
            "passed": self.passed,
            "comparisons": self.rows(),
        }


# -- new labels against the trusted model ----------------------------------------------------------
@dataclass(frozen=True)
class LabelAgreement:
    """Production's predictions on new labelled rows, tested against what production achieves on its
    evaluation set: far lower agreement means the labels, not the model, are wrong."""

    production_version: int
    rows: int
    agreeing: int
    reference: float  # the lower confidence bound of production's own accuracy
    reference_basis: str
    p_value: float
    p_threshold: float
    disagreements: tuple[tuple[str, str, int], ...]  # (label given, production predicts, rows), most first

    @property
    def agreement(self) -> float:
        return self.agreeing / self.rows if self.rows else 1.0

    @property
    def passed(self) -> bool:
        return self.p_value >= self.p_threshold

    @property
    def message(self) -> str:
        pairs = ", ".join(
            f"labelled {given} where production predicts {predicted}: {count}"
            for given, predicted, count in self.disagreements[:6]
        )
        summary = (
            f"{self.rows - self.agreeing} of {self.rows} rows disagree with production v{self.production_version} "
            f"(agreement {self.agreement:.4f}; expected at least {self.reference:.4f}, {self.reference_basis}; "
            f"one-sided binomial p = {self.p_value:.3g})"
        )
        if self.passed:
            return f"the labels agree with production: {summary}"
        return (
            f"the data looks mislabelled, blocked (p < validation.mislabel_p_value = {self.p_threshold:g}): "
            f"{summary}. {pairs}"
        )


def label_agreement(
    labels: np.ndarray,
    predictions: np.ndarray,
    class_names: dict[int, str],
    production_version: int,
    production_correct: int,
    production_rows: int,
    p_threshold: float,
) -> LabelAgreement:
    """Block labels that production disagrees with far more than its own error rate explains.

    The reference is the one-sided 95% Clopper-Pearson lower bound of production's accuracy on its
    evaluation set (``production_correct`` of ``production_rows``): a model measured on few rows is
    not held to a perfect score. The agreement on the new rows is tested against it with a one-sided
    exact binomial test; a p-value below ``p_threshold`` blocks.
    """
    labels, predictions = np.asarray(labels), np.asarray(predictions)
    agreeing = int(np.sum(labels == predictions))
    reference = float(stats.binomtest(production_correct, production_rows).proportion_ci(0.90, "exact").low)
    p_value = (
        float(stats.binomtest(agreeing, len(labels), reference, alternative="less").pvalue) if len(labels) else 1.0
    )
    pairs = Counter(
        (class_names.get(int(given), str(given)), class_names.get(int(predicted), str(predicted)))
        for given, predicted in zip(labels, predictions, strict=True)
        if given != predicted
    )
    return LabelAgreement(
        production_version=production_version,
        rows=int(len(labels)),
        agreeing=agreeing,
        reference=reference,
        reference_basis=(
            f"the 95% lower bound of production's {production_correct}/{production_rows} on its evaluation set"
        ),
        p_value=p_value,
        p_threshold=float(p_threshold),
        disagreements=tuple((given, predicted, count) for (given, predicted), count in pairs.most_common()),
    )
