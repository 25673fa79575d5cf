"""Synthetic wine data of any size: a seeded bootstrap of the 178 real rows with gaussian jitter.

Each feature gets noise with a standard deviation of ``jitter`` times its spread in the real
data, then is clipped to the schema's bounds, so every row passes validation and the classes
stay about as separable as in the real data. Usage: python synthetic.py ROWS OUT.csv [SEED]
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd

from wine_assets.ingestion import load_builtin_frame
from wine_assets.validation import BOUNDS, FEATURE_COLUMNS, TARGET_COLUMN


def synthetic_frame(rows: int, seed: int = 0, jitter: float = 0.05) -> pd.DataFrame:
    base = load_builtin_frame()
    rng = np.random.default_rng(seed)
    picked = base.iloc[rng.integers(0, len(base), size=rows)].reset_index(drop=True)
    features = picked.loc[:, list(FEATURE_COLUMNS)].to_numpy(dtype=np.float64, copy=True)
    spread = base.loc[:, list(FEATURE_COLUMNS)].std().to_numpy()
    features += rng.normal(0.0, 1.0, size=features.shape) * spread * jitter
    lows = np.array([BOUNDS[name][0] for name in FEATURE_COLUMNS])
    highs = np.array([BOUNDS[name][1] for name in FEATURE_COLUMNS])
    frame = pd.DataFrame(np.clip(features, lows, highs).round(4), columns=list(FEATURE_COLUMNS))
    frame[TARGET_COLUMN] = picked[TARGET_COLUMN].to_numpy()
    return frame


def linear_frame(rows: int = 240, seed: int = 7) -> pd.DataFrame:
    """Wine-shaped rows whose class is the argmax of linear scores of the features: logistic
    regression fits it, axis-aligned trees do not (a forest scores about 0.75, the linear model
    about 0.95). The experiments' benchmark and tests use it as the dataset where production is weak."""
    wine = load_builtin_frame()
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame(
        {name: rng.uniform(wine[name].quantile(0.05), wine[name].quantile(0.95), rows) for name in FEATURE_COLUMNS}
    )
    standard = ((frame - frame.mean()) / frame.std()).to_numpy()
    frame[TARGET_COLUMN] = np.argmax(standard @ rng.normal(size=(len(FEATURE_COLUMNS), 3)), axis=1).astype("int64")
    return frame


def write_csv(rows: int, path: Path, seed: int = 0) -> Path:
    synthetic_frame(rows, seed).to_csv(path, index=False)
    return path


if __name__ == "__main__":
    write_csv(int(float(sys.argv[1])), Path(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else 0)
