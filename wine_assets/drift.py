"""Feature drift: each feature of new data against the data the production model was trained on."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from wine_assets.validation import FEATURE_COLUMNS


@dataclass(frozen=True)
class DriftRow:
    feature: str
    statistic: float
    p_value: float
    drifted: bool


def reference_sample(train: pd.DataFrame, max_rows: int, seed: int) -> pd.DataFrame:
    """The training features, or a seeded random sample of at most ``max_rows`` of them."""
    features = train.loc[:, list(FEATURE_COLUMNS)]
    if len(features) > max_rows:
        features = features.sample(n=max_rows, random_state=seed)
    return features.reset_index(drop=True)


def feature_drift(current: pd.DataFrame, reference: pd.DataFrame, p_threshold: float) -> list[DriftRow]:
    """Two-sample Kolmogorov-Smirnov test per feature; drifted when p < ``p_threshold``.

    Values that are missing or not numbers are left out (the schema checks report them).
    A feature absent from either frame is left out too.
    """
    from scipy.stats import ks_2samp

    rows = []
    for feature in FEATURE_COLUMNS:
        if feature not in current.columns or feature not in reference.columns:
            continue
        new = pd.to_numeric(current[feature], errors="coerce").to_numpy(dtype=float)
        old = pd.to_numeric(reference[feature], errors="coerce").to_numpy(dtype=float)
        new, old = new[~np.isnan(new)], old[~np.isnan(old)]
        if new.size == 0 or old.size == 0:
            continue
        test = ks_2samp(new, old)
        p_value = float(test.pvalue)
        rows.append(DriftRow(feature, float(test.statistic), p_value, p_value < p_threshold))
    return rows
