"""Model-quality gates as plain functions: the accuracy threshold and the regression warning."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


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


@dataclass(frozen=True)
class RegressionGate:
    accuracy: float
    max_regression: float
    production_version: int | None = None
    production_accuracy: float | None = None

    @property
    def change(self) -> float | None:
        if self.production_accuracy is None:
            return None
        return float(self.accuracy - self.production_accuracy)

    @property
    def passed(self) -> bool:
        change = self.change
        return change is None or change >= -self.max_regression

    @property
    def message(self) -> str:
        if self.production_version is None:
            return "no model in production yet: nothing to compare with"
        verdict = "within" if self.passed else "beyond"
        return (
            f"test accuracy {self.accuracy:.4f} vs production v{self.production_version} "
            f"{self.production_accuracy:.4f}: change {self.change:+.4f}, {verdict} the allowed drop "
            f"evaluation.max_regression = {self.max_regression:.4f}"
        )


def regression_gate(
    accuracy: float, production_manifest: Mapping[str, Any] | None, max_regression: float
) -> RegressionGate:
    """Compare with the production manifest's accuracy; None means nothing is in production."""
    if production_manifest is None:
        return RegressionGate(float(accuracy), float(max_regression))
    return RegressionGate(
        float(accuracy),
        float(max_regression),
        int(production_manifest["version"]),
        float(production_manifest["metrics"]["accuracy"]),
    )
