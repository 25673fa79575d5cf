"""Features: the stratified train/test split and the scaler fitted on training rows only."""

from __future__ import annotations

import hashlib

import pandas as pd
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler

from wine_assets.validation import FEATURE_COLUMNS, TARGET_COLUMN


def split_frame(frame: pd.DataFrame, test_size: float, random_state: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Stratified split by target; both halves keep the source attrs (source, fingerprint)."""
    train, test = train_test_split(frame, test_size=test_size, random_state=random_state, stratify=frame[TARGET_COLUMN])
    for part in (train, test):
        part.attrs = dict(frame.attrs)
    return train, test


def features_of(frame: pd.DataFrame) -> pd.DataFrame:
    """The feature columns in the schema's order, whatever order the frame holds them in."""
    return frame.loc[:, list(FEATURE_COLUMNS)]


def fit_scaler(train: pd.DataFrame) -> StandardScaler:
    """A StandardScaler fitted on the training features only, so no test data leaks in."""
    return StandardScaler().fit(features_of(train))


def frame_digest(frame: pd.DataFrame) -> str:
    """sha256 of a frame's columns, index and values (pandas' row hashes, fast at a million rows)."""
    digest = hashlib.sha256("\x1f".join(map(str, frame.columns)).encode("utf-8"))
    digest.update(pd.util.hash_pandas_object(frame, index=True).to_numpy().tobytes())
    return digest.hexdigest()
