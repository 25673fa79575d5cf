"""The serving API's plain parts, without a server: scoring, input parsing, routing, statistics.

Unit tests unless marked otherwise: the watcher over a registry on disk is a component test, the
routing checked in other interpreters an integration test."""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from sklearn.linear_model import LogisticRegression

from wine_assets import model_format
from wine_assets.features import fit_scaler, split_frame
from wine_assets.ingestion import load_builtin_frame
from wine_assets.params import ModelParams, ParamsError, ServingParams, params_from_mapping
from wine_assets.predict import score
from wine_assets.registry import Bundle, ModelRegistry
from wine_assets.serving import forest, inputs, metrics
from wine_assets.serving.report import build_report, format_report, two_proportion_test, wilson_interval
from wine_assets.serving.state import ServingState, assign, route_fraction
from wine_assets.training import train_model
from wine_assets.validation import BOUNDS, FEATURE_COLUMNS

from .support import resign

MANIFEST = {"class_values": [0, 1, 2], "class_labels": ["class_0", "class_1", "class_2"]}


@pytest.fixture(scope="module")
def train():
    frame = load_builtin_frame()
    frame = frame.rename(columns=dict(zip(frame.columns[:13], FEATURE_COLUMNS, strict=True)))
    return split_frame(frame, 0.2, 42)[0]


def bundle_of(model, scaler) -> Bundle:
    return Bundle(version=1, path=None, manifest=MANIFEST, model=model, scaler=scaler)


def random_rows(count: int, seed: int = 0) -> np.ndarray:
    lows = np.array([BOUNDS[name][0] for name in FEATURE_COLUMNS])
    highs = np.array([BOUNDS[name][1] for name in FEATURE_COLUMNS])
    return lows + np.random.default_rng(seed).random((count, len(FEATURE_COLUMNS))) * (highs - lows)


def sklearn_probabilities(bundle: Bundle, rows: np.ndarray) -> np.ndarray:
    scored = score(bundle, pd.DataFrame(rows, columns=list(FEATURE_COLUMNS)))
    return scored[[f"probability_{label}" for label in MANIFEST["class_labels"]]].to_numpy()


@pytest.mark.unit
@pytest.mark.parametrize("model_params", [ModelParams(), ModelParams(n_estimators=7, max_depth=3, random_state=3)])
def test_served_forest_is_bit_identical_to_scikit_learn_on_100000_random_rows(train, model_params):
    scaler = fit_scaler(train)
    bundle = bundle_of(train_model(train, scaler, model_params).model, scaler)
    served = forest.prepare(bundle, random_rows(50, seed=1))
    assert served.fast
    rows = random_rows(100_000)
    expected = sklearn_probabilities(bundle, rows)
    # one call (each tree's own predict), and batches small enough for the packed walk
    assert np.array_equal(served.predict_proba(rows), expected)
    batched = np.vstack([served.predict_proba(rows[start : start + 64]) for start in range(0, 19_200, 64)])
    assert np.array_equal(batched, expected[:19_200])
    single = np.vstack([served.predict_proba(rows[row : row + 1]) for row in range(300)])
    assert np.array_equal(single, expected[:300])


@pytest.mark.unit
def test_another_estimator_is_scored_by_scikit_learn_itself(train):
    scaler = fit_scaler(train)
    features = scaler.transform(train[list(FEATURE_COLUMNS)])
    model = LogisticRegression(max_iter=500).fit(features, train["target"])
    bundle = bundle_of(model, scaler)
    served = forest.prepare(bundle, random_rows(20))
    assert not served.fast
    rows = random_rows(500, seed=4)
    assert np.abs(served.predict_proba(rows) - sklearn_probabilities(bundle, rows)).max() <= forest.TOLERANCE


@pytest.mark.unit
def test_a_model_whose_classes_the_manifest_does_not_name_is_not_served(train):
    scaler = fit_scaler(train)
    model = train_model(train, scaler, ModelParams(n_estimators=3)).model
    bundle = Bundle(1, None, {"class_values": [0, 1], "class_labels": ["a", "b"]}, model, scaler)
    with pytest.raises(forest.VerificationError, match=r"classes \[2\] are not in its manifest"):
        forest.prepare(bundle, random_rows(5))


@pytest.mark.component
def test_a_version_that_passes_its_checksums_but_cannot_be_unpickled_is_not_served(train, tmp_path):
    """Say a bundle written by another library version: the watcher counts the failure, keeps
    serving the old version and does not retry it on every poll."""
    scaler = fit_scaler(train)
    model = train_model(train, scaler, ModelParams(n_estimators=5)).model
    registry = ModelRegistry(tmp_path / "registry")
    files = {"model.skops": model_format.dumps(model), "scaler.skops": model_format.dumps(scaler)}
    registry.publish(files, MANIFEST)
    registry.publish({**files, "model.skops": model_format.dumps(scaler)}, MANIFEST, set_production=False)
    broken = registry.version_dir(2) / "model.skops"
    broken.write_bytes(b"\x80\x05not a pickle")
    manifest_path = registry.version_dir(2) / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["files"]["model.skops"]["sha256"] = hashlib.sha256(broken.read_bytes()).hexdigest()
    manifest_path.write_text(json.dumps(manifest))
    resign(registry.version_dir(2))  # signed as it is: only loading it fails
    state = ServingState(registry.root, ServingParams(reload_interval_seconds=0.1), retry_seconds=60)
    failures = metrics.RELOADS.labels("production", "failure")
    state.poll_once()
    assert state.production is not None and state.production.version == 1
    registry.alias_path.write_text("v2\n")
    before = failures._value.get()
    state.poll_once()
    state.poll_once()  # within retry_seconds: not loaded again
    assert failures._value.get() == before + 1
    assert state.production.version == 1 and state.last_failure.version == 2


# -- input parsing ------------------------------------------------------------------------------------
ROW = [13.2, 1.78, 2.14, 11.2, 100.0, 2.65, 2.76, 0.26, 1.28, 4.38, 1.05, 3.4, 1050.0]


@pytest.mark.unit
def test_every_mlflow_shape_gives_the_same_array():
    record = dict(zip(FEATURE_COLUMNS, ROW, strict=True))
    shuffled = dict(reversed(list(record.items())))
    documents = [
        {"dataframe_split": {"columns": list(reversed(FEATURE_COLUMNS)), "data": [ROW[::-1]], "index": [7]}},
        {"dataframe_records": [shuffled]},
        {"instances": [record]},
        {"instances": [ROW]},
        {"inputs": {name: [value] for name, value in shuffled.items()}},
        {"inputs": [ROW], "params": {}},
    ]
    for document in documents:
        assert inputs.parse_mlflow_json(document, 10).values.tolist() == [ROW], document
    csv_text = ",".join(reversed(FEATURE_COLUMNS)) + "\r\n" + ",".join(map(str, ROW[::-1])) + "\r\n"
    assert inputs.parse_csv(csv_text.encode(), 10).values.tolist() == [ROW]


@pytest.mark.unit
def test_extra_columns_are_ignored_with_a_warning():
    record = {**dict(zip(FEATURE_COLUMNS, ROW, strict=True)), "vintage": 1999}
    parsed = inputs.parse_mlflow_json({"dataframe_records": [record]}, 10)
    assert parsed.values.tolist() == [ROW]
    assert parsed.warnings == ["ignored column(s) the model does not use: vintage"]


@pytest.mark.unit
def test_open_inference_tensors_flat_nested_integer_and_per_feature():
    integers = [13, 2, 2, 11, 100, 3, 3, 1, 1, 4, 1, 3, 1050]
    cases = [
        ({"name": "x", "shape": [2, 13], "datatype": "FP32", "data": ROW + ROW}, [ROW, ROW]),
        ({"name": "x", "shape": [2, 13], "datatype": "FP64", "data": [ROW, ROW]}, [ROW, ROW]),
        ({"name": "x", "shape": [1, 13], "datatype": "INT32", "data": integers}, [integers]),
    ]
    for tensor, expected in cases:
        assert inputs.parse_infer({"inputs": [tensor]}, 10, ("a",)).features.values.tolist() == expected
    per_feature = [
        {"name": name, "shape": [1, 1], "datatype": "FP64", "data": [[value]]}
        for name, value in zip(FEATURE_COLUMNS, ROW, strict=True)
    ]
    parsed = inputs.parse_infer({"id": "r1", "inputs": per_feature, "outputs": [{"name": "a"}]}, 10, ("a", "b"))
    assert parsed.features.values.tolist() == [ROW] and parsed.id == "r1" and parsed.outputs == ["a"]


@pytest.mark.unit
@pytest.mark.parametrize(
    ("document", "words"),
    [
        ({"inputs": {"alcohol": [1.0, 2.0], "ash": [1.0]}}, "different lengths (alcohol: 2, ash: 1)"),
        ({"inputs": [{"name": "x", "shape": [1, 13], "datatype": "FP64", "data": [ROW[:6], ROW[6:]]}]}, "nesting"),
        ({"inputs": [{"name": "x", "shape": [1, -13], "datatype": "FP64", "data": ROW}]}, "non-negative integers"),
        ({"inputs": [{"name": "x", "shape": [1, 13], "datatype": "FP64"}]}, "lacks data"),
        ({"inputs": [{"name": "x", "shape": [1, 13], "datatype": "FP64", "data": ROW, "x": 1}]}, "unknown key(s) x"),
    ],
)
def test_malformed_tensors_are_400_with_the_reason(document, words):
    parse = inputs.parse_mlflow_json if "name" not in str(document) else inputs.parse_infer
    with pytest.raises(inputs.RequestError) as raised:
        parse(document, 10, ("a",)) if parse is inputs.parse_infer else parse(document, 10)
    assert raised.value.status == 400 and words in raised.value.message


@pytest.mark.unit
def test_nan_and_infinity_are_refused_in_json_and_csv():
    for text in (b'{"inputs": [[NaN]]}', b'{"inputs": [[Infinity]]}', b'{"inputs": [[-Infinity]]}'):
        with pytest.raises(inputs.RequestError, match="is not a number JSON allows"):
            inputs.decode_json(text)
    row = ",".join(["inf", *map(str, ROW[1:])])
    with pytest.raises(inputs.RequestError, match="column 'alcohol', row 0: 'inf' is not a finite number"):
        inputs.parse_csv((",".join(FEATURE_COLUMNS) + "\n" + row).encode(), 10)


# -- routing -----------------------------------------------------------------------------------------------
@pytest.mark.integration
def test_assignment_is_the_same_in_processes_with_different_hash_seeds():
    """What makes the split the same in every uvicorn worker: each is its own interpreter."""
    keys = [f"user-{number}" for number in range(300)]
    here = [assign("exp-a", 0.5, key) for key in keys]
    code = (
        "from wine_assets.serving.state import assign\n"
        f"print(','.join(assign('exp-a', 0.5, f'user-{{n}}') for n in range({len(keys)})))"
    )
    others = [  # both interpreters at once: their start-up is most of the cost
        subprocess.Popen(
            [sys.executable, "-c", code],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONHASHSEED": seed},
        )
        for seed in ("1", "2")
    ]
    for other in others:
        out, err = other.communicate(timeout=120)
        assert other.returncode == 0, err
        assert out.strip().split(",") == here


@pytest.mark.unit
def test_routing_fractions_are_uniform_and_independent_per_experiment():
    keys = [f"k{number}" for number in range(20_000)]
    first = np.array([route_fraction("a", key) for key in keys])
    second = np.array([route_fraction("b", key) for key in keys])
    assert stats.kstest(first, "uniform").pvalue > 0.001
    assert abs(np.corrcoef(first, second)[0, 1]) < 0.05
    assert assign(None, 0.5, "k1") == "production" and assign("a", 0.0, "k1") == "production"
    assert {assign("a", 1.0, key) for key in keys[:100]} == {"candidate"}


# -- the serving report's statistics ------------------------------------------------------------------------
@pytest.mark.unit
def test_wilson_interval_matches_the_textbook_value():
    # Newcombe (1998), table I: 81 of 263 -> 0.2553 to 0.3662
    low, high = wilson_interval(81, 263)
    assert (round(low, 4), round(high, 4)) == (0.2553, 0.3662)
    assert wilson_interval(10, 10)[1] == 1.0 and wilson_interval(0, 10)[0] == 0.0
    assert wilson_interval(0, 0) is None


@pytest.mark.unit
def test_two_proportion_test_agrees_with_a_chi_square_test():
    result = two_proportion_test(90, 100, 75, 100)
    chi2 = stats.chi2_contingency([[90, 10], [75, 25]], correction=False)
    assert math.isclose(result["p_value"], chi2.pvalue, rel_tol=1e-9)
    assert result["difference"] == pytest.approx(0.15)
    assert result["interval_low"] < result["difference"] < result["interval_high"]


def _rows(variant, correct, wrong, unlabelled=0, version=1):
    return (
        [(variant, version, 1, None, None, 1)] * correct
        + [(variant, version, 1, None, None, 0)] * wrong
        + [(variant, version, 1, None, None, None)] * unlabelled
    )


@pytest.mark.unit
def test_a_split_report_tests_with_fisher_and_decides_only_with_enough_labels():
    rows = _rows("production", 60, 40, unlabelled=5) + _rows("candidate", 90, 10, version=2)
    report = build_report(rows, "exp", min_labelled=30)
    by_variant = {s.variant: s for s in report.variants}
    assert by_variant["production"].predictions == 105 and by_variant["production"].labelled == 100
    assert report.mode == "split"
    assert report.comparison["fisher_p_value"] == pytest.approx(stats.fisher_exact([[90, 10], [60, 40]])[1])
    assert report.decision.startswith("the candidate is more accurate")
    assert not report.warnings
    few = build_report(_rows("production", 5, 1) + _rows("candidate", 1, 5), "exp", min_labelled=30)
    assert few.warnings and "too few labelled predictions to decide" in few.warnings[0]
    assert few.decision == "no decision: too few labelled predictions"
    same = build_report(_rows("production", 80, 20) + _rows("candidate", 81, 19), "exp", min_labelled=30)
    assert same.decision.startswith("no significant difference")
    assert "decision: no significant difference" in format_report(same)


@pytest.mark.unit
def test_a_shadow_report_measures_agreement_and_uses_mcnemar():
    # 100 labelled requests both scored: shadow right and production wrong on 20, the reverse on 2.
    rows = (
        [("production", 1, 1, 2, 1, 1)] * 70
        + [("production", 1, 0, 2, 1, 1)] * 20
        + [("production", 1, 1, 2, 0, 1)] * 2
        + [("production", 1, 0, 2, 0, 1)] * 8
    )
    report = build_report(rows, "shadow-exp", min_labelled=30)
    assert report.mode == "shadow"
    assert report.comparison["agreement"] == pytest.approx(0.78)
    assert report.comparison["mcnemar_p_value"] == pytest.approx(stats.binomtest(20, 22, 0.5).pvalue)
    assert report.decision.startswith("the candidate is more accurate")
    shadow = {s.variant: s for s in report.variants}["shadow"]
    assert shadow.labelled == 100 and shadow.correct == 90


@pytest.mark.unit
def test_serving_params_are_validated_with_the_key_named():
    with pytest.raises(ParamsError, match=r"serving.candidate_weight = 1.5 is out of range"):
        params_from_mapping({"serving": {"candidate_weight": 1.5}})
    with pytest.raises(ParamsError, match="experiment and candidate_version go together"):
        params_from_mapping({"serving": {"candidate_version": 3}})
    with pytest.raises(ParamsError, match="serving.candidate_mode"):
        params_from_mapping({"serving": {"candidate_mode": "canary"}})
    assert params_from_mapping({"serving": {"experiment": "e", "candidate_version": 2}}).serving.candidate_version == 2


@pytest.mark.unit
def test_report_text_lists_each_variant():
    text = format_report(build_report(_rows("production", 3, 1) + _rows("candidate", 2, 2), None, 1))
    lines = io.StringIO(text).read().splitlines()
    assert any(line.startswith("production") and "0.750" in line for line in lines)
    assert any(line.startswith("candidate") and "0.500" in line for line in lines)
