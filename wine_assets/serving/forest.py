"""A released bundle made ready to serve: verified, checked against scikit-learn, warmed.

scikit-learn's ``predict_proba`` costs 15-30 ms on one row, nearly all of it per-call input
validation and thread-pool set-up. A forest's probabilities are the mean of its trees' leaf
values, so this module computes exactly that, with scikit-learn's own arithmetic:

* rows are scaled as ``StandardScaler.transform`` does (``(x - mean) / scale`` in float64),
  then converted to float32, as the forest converts its input;
* small batches walk every tree at once: the trees' node arrays are packed into one set of
  arrays and all (row, tree) pairs step down a level per NumPy operation, comparing the
  float32 value with the float64 threshold as scikit-learn's ``Tree.apply`` does;
* large batches call each fitted tree's ``tree_.predict``, which is fast per row there;
* the trees' leaf values are added in the estimators' order (``cumsum`` adds sequentially,
  as the forest's accumulation does) and divided by the number of trees.

So the probabilities are bit-identical to scikit-learn's. Any other estimator (or a scaler
that is not a fitted StandardScaler) is scored through scikit-learn itself. Either way,
``prepare`` compares the result with scikit-learn's on the release's reference rows before
the model may serve.
"""

from __future__ import annotations

import dataclasses
import io
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from sklearn.ensemble import ExtraTreesClassifier, RandomForestClassifier
from sklearn.preprocessing import StandardScaler

from wine_assets.predict import score as batch_score
from wine_assets.registry import REFERENCE_FILE, Bundle, ModelRegistry, RegistryError
from wine_assets.validation import BOUNDS, FEATURE_COLUMNS

#: Largest difference allowed between the served and scikit-learn's probabilities at load.
TOLERANCE = 1e-9


class VerificationError(RegistryError):
    """A version that loaded but does not predict what scikit-learn predicts: it is not served."""


#: Batches up to this many rows walk the packed trees; larger ones call each tree's own predict.
PACKED_ROWS = 64


class PackedTrees:
    """Every tree's nodes in one set of arrays, for walking all trees at once."""

    def __init__(self, trees: tuple[Any, ...], n_classes: int):
        offsets = np.cumsum([0] + [tree.node_count for tree in trees[:-1]])
        self.roots = offsets.astype(np.intp)
        self.feature = np.concatenate([tree.feature for tree in trees]).astype(np.intp)
        self.threshold = np.concatenate([tree.threshold for tree in trees])
        # Leaves have no children (-1); they are never followed, so any in-range index will do.
        self.left = np.concatenate(
            [
                np.where(tree.children_left >= 0, tree.children_left + offset, 0)
                for tree, offset in zip(trees, offsets, strict=True)
            ]
        ).astype(np.intp)
        self.right = np.concatenate(
            [
                np.where(tree.children_right >= 0, tree.children_right + offset, 0)
                for tree, offset in zip(trees, offsets, strict=True)
            ]
        ).astype(np.intp)
        self.is_leaf = self.feature < 0
        self.safe_feature = np.where(self.is_leaf, 0, self.feature)
        self.value = np.concatenate([tree.value[:, 0, :n_classes] for tree in trees])
        self.n_trees = len(trees)

    def predict_proba(self, rows: np.ndarray) -> np.ndarray:
        """Mean leaf value over the trees for float32 ``rows`` (already scaled)."""
        nodes = np.repeat(self.roots[np.newaxis, :], rows.shape[0], axis=0)
        row_index = np.arange(rows.shape[0])[:, np.newaxis]
        while True:
            internal = ~self.is_leaf[nodes]
            if not internal.any():
                break
            # float32 value against float64 threshold, compared in float64, as Tree.apply does
            left = rows[row_index, self.safe_feature[nodes]] <= self.threshold[nodes]
            nodes = np.where(internal, np.where(left, self.left[nodes], self.right[nodes]), nodes)
        # Sequential sum over the trees in their order (cumsum), as the forest accumulates them.
        total = np.cumsum(self.value[nodes], axis=1)[:, -1, :]
        total /= self.n_trees
        return total


@dataclass(frozen=True)
class ServedModel:
    """One loaded version, ready to score ``[rows, 13]`` float64 arrays."""

    version: int
    manifest: dict[str, Any]
    bundle: Bundle
    class_values: tuple[int, ...]
    class_labels: tuple[str, ...]
    fast: bool
    load_seconds: float = 0.0
    _trees: tuple[Any, ...] = field(default=(), repr=False)
    _mean: np.ndarray | None = field(default=None, repr=False)
    _scale: np.ndarray | None = field(default=None, repr=False)
    _packed: PackedTrees | None = field(default=None, repr=False)

    @property
    def probability_names(self) -> tuple[str, ...]:
        return tuple(f"probability_{label}" for label in self.class_labels)

    def predict_proba(self, values: np.ndarray) -> np.ndarray:
        """One row of class probabilities per input row, in ``class_values`` order."""
        if not self.fast:
            return self.bundle.model.predict_proba(
                self.bundle.scaler.transform(pd.DataFrame(values, columns=list(FEATURE_COLUMNS)))
            )
        scaled = values - self._mean
        scaled /= self._scale
        rows = np.ascontiguousarray(scaled, dtype=np.float32)
        if rows.shape[0] <= PACKED_ROWS:
            return self._packed.predict_proba(rows)
        n_classes = len(self.class_values)
        total = np.zeros((rows.shape[0], n_classes))
        for tree in self._trees:
            total += tree.predict(rows)[:, :n_classes]
        total /= len(self._trees)
        return total

    def predict(self, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(class index per row, probabilities)."""
        probabilities = self.predict_proba(values)
        return probabilities.argmax(axis=1), probabilities

    def records(self, chosen: np.ndarray, probabilities: np.ndarray) -> list[dict[str, Any]]:
        """The rows as ``wine-assets predict`` writes them: class, label, one probability per class."""
        names = self.probability_names
        return [
            {
                "predicted_class": self.class_values[index],
                "predicted_label": self.class_labels[index],
                **dict(zip(names, row, strict=True)),
            }
            for index, row in zip(chosen.tolist(), probabilities.tolist(), strict=True)
        ]


def _fast_parts(bundle: Bundle) -> tuple[tuple[Any, ...], np.ndarray, np.ndarray] | None:
    model, scaler = bundle.model, bundle.scaler
    if type(model) not in (RandomForestClassifier, ExtraTreesClassifier) or type(scaler) is not StandardScaler:
        return None
    if getattr(model, "n_outputs_", 1) != 1 or not scaler.with_mean or not scaler.with_std:
        return None
    return tuple(estimator.tree_ for estimator in model.estimators_), scaler.mean_, scaler.scale_


def warm_rows(registry: ModelRegistry, version: int) -> np.ndarray:
    """The release's reference rows (verified) when it has them, else the middle of each bound."""
    try:
        content = registry.read_file(version, REFERENCE_FILE)
        frame = pd.read_csv(io.BytesIO(content))
        rows = frame.loc[:, list(FEATURE_COLUMNS)].to_numpy(dtype=np.float64)[:200]
        if rows.shape[0]:
            return rows
    except (RegistryError, KeyError, ValueError):
        pass
    return np.array([[(BOUNDS[name][0] + BOUNDS[name][1]) / 2 for name in FEATURE_COLUMNS]])


def prepare(bundle: Bundle, check_rows: np.ndarray) -> ServedModel:
    """A bundle checked against scikit-learn's own predictions on ``check_rows``, and warmed."""
    classes = [int(value) for value in bundle.model.classes_]
    labels_by_value = dict(zip(bundle.manifest["class_values"], bundle.manifest["class_labels"], strict=True))
    missing = [value for value in classes if value not in labels_by_value]
    if missing:
        raise VerificationError(f"v{bundle.version}: the model's classes {missing} are not in its manifest")
    parts = _fast_parts(bundle)
    served = ServedModel(
        version=bundle.version,
        manifest=bundle.manifest,
        bundle=bundle,
        class_values=tuple(classes),
        class_labels=tuple(labels_by_value[value] for value in classes),
        fast=parts is not None,
        _trees=parts[0] if parts else (),
        _mean=parts[1] if parts else None,
        _scale=parts[2] if parts else None,
        _packed=PackedTrees(parts[0], len(classes)) if parts else None,
    )
    frame = pd.DataFrame(check_rows, columns=list(FEATURE_COLUMNS))
    expected = batch_score(bundle, frame)
    expected_probabilities = expected[list(served.probability_names)].to_numpy()
    expected_classes = expected["predicted_class"].to_numpy()
    # Both ways of scoring: the whole set at once (each tree's own predict when it is large) and
    # in blocks small enough for the packed walk, which answers most requests.
    blocks = [check_rows[start : start + PACKED_ROWS] for start in range(0, len(check_rows), PACKED_ROWS)]
    for label, probabilities in (
        ("in one batch", served.predict_proba(check_rows)),
        ("in small batches", np.vstack([served.predict_proba(block) for block in blocks])),
    ):
        difference = float(np.abs(probabilities - expected_probabilities).max())
        classes = np.asarray(served.class_values)[probabilities.argmax(axis=1)]
        if not difference <= TOLERANCE or not np.array_equal(classes, expected_classes):  # NaN fails too
            raise VerificationError(
                f"v{bundle.version}: served probabilities ({label}) differ from scikit-learn's by {difference:.3g} "
                f"(allowed {TOLERANCE}); the version is not served"
            )
    for _ in range(3):  # warm: first calls pay for lazy imports and allocator growth
        served.predict(check_rows[:1])
    return served


def load(registry: ModelRegistry, version: int | str | None = None) -> ServedModel:
    """Load a version (production by default): signature and sha256 verified first, then ``prepare``."""
    started = time.perf_counter()
    bundle = registry.load(version)
    served = prepare(bundle, warm_rows(registry, bundle.version))
    return dataclasses.replace(served, load_seconds=time.perf_counter() - started)
