"""What the serving tests share (test_serving_app.py in-process, test_serving.py over real HTTP):
two real model versions to publish, a valid row, the answer `wine_assets.predict.predict` gives,
and reading Prometheus' text format."""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import httpx
import pandas as pd

from wine_assets import model_format
from wine_assets.features import fit_scaler, split_frame
from wine_assets.ingestion import load_builtin_frame
from wine_assets.params import ModelParams
from wine_assets.predict import clear_cache, predict
from wine_assets.registry import REFERENCE_FILE, ModelRegistry
from wine_assets.serving.access import hash_token, new_token
from wine_assets.training import train_model
from wine_assets.validation import FEATURE_COLUMNS

with warnings.catch_warnings():  # Starlette asks for httpx2 in its test client; httpx is what the project has
    warnings.simplefilter("ignore", UserWarning)
    from starlette.testclient import TestClient as _StarletteTestClient


class TestClient(_StarletteTestClient):
    """The serving tests' in-process client. It sends ``Host: localhost``, as a local client does
    (Starlette's default, ``testserver``, is not in the server's default serving.allowed_hosts)."""

    __test__ = False  # not a test class, whatever pytest's name rule says

    def __init__(self, app, base_url: str = "http://localhost", **kwargs) -> None:
        super().__init__(app, base_url=base_url, **kwargs)


# A labeller's token, made afresh for each test process (no token is kept in a file), and the
# serving.tokens entry (its hash) that lets it send feedback.
FEEDBACK_TOKEN = new_token()
LABELLER = "labeller"
FEEDBACK_TOKENS = [{"name": LABELLER, "sha256": hash_token(FEEDBACK_TOKEN), "scopes": ["feedback"]}]


def bearer(token: str = FEEDBACK_TOKEN) -> dict[str, str]:
    """The Authorization header that shows ``token`` (by default the labeller's, for /feedback)."""
    return {"Authorization": f"Bearer {token}"}


MODEL = "/v2/models/wine-classifier"
PROBABILITIES = ["probability_class_0", "probability_class_1", "probability_class_2"]
ROW = [13.2, 1.78, 2.14, 11.2, 100.0, 2.65, 2.76, 0.26, 1.28, 4.38, 1.05, 3.4, 1050.0]
RECORD = dict(zip(FEATURE_COLUMNS, ROW, strict=True))


def wine_features() -> pd.DataFrame:
    """The built-in wines with the feature names the API uses (and ``target``)."""
    frame = load_builtin_frame()
    return frame.rename(columns=dict(zip(frame.columns[:13], FEATURE_COLUMNS, strict=True)))


@dataclass
class Versions:
    """Bundles ready to publish: the production forest (1) and a small, different challenger (2)."""

    files: dict[int, dict[str, bytes]]
    fields: dict


def train_versions(wines: pd.DataFrame) -> Versions:
    train, _ = split_frame(wines, 0.2, 42)
    scaler = fit_scaler(train)
    files = {}
    for number, model_params in ((1, ModelParams()), (2, ModelParams(n_estimators=3, max_depth=2, random_state=7))):
        model = train_model(train, scaler, model_params).model
        files[number] = {
            "model.skops": model_format.dumps(model),
            "scaler.skops": model_format.dumps(scaler),
            REFERENCE_FILE: train.drop(columns="target").to_csv(index=False).encode(),
        }
    return Versions(files, {"class_values": [0, 1, 2], "class_labels": ["class_0", "class_1", "class_2"]})


def publish(registry_dir: Path, versions: Versions, number: int, production: bool = True) -> int:
    return (
        ModelRegistry(registry_dir).publish(versions.files[number], versions.fields, set_production=production).version
    )


def expected_predictions(registry_dir: Path, frame: pd.DataFrame, version: str | None = None) -> pd.DataFrame:
    """The batch path's answer for these rows: what every served answer must equal bit for bit."""
    clear_cache()
    return predict(frame[list(FEATURE_COLUMNS)], registry_dir=registry_dir, version=version).predictions


def check_headers(response: httpx.Response) -> None:
    assert re.fullmatch(r"[A-Za-z0-9._:-]{1,128}", response.headers["x-request-id"])
    assert response.headers["x-model-version"]


def metric_value(text: str, name: str, **labels) -> float:
    """The sum of the samples of ``name`` whose labels include ``labels``, in Prometheus' text format."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}")[0])) if "{" in line else {}
        if all(found.get(key) == str(value) for key, value in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total
