"""Predictions from the released model: the Python API, input validation, and the command in-process."""

import json
import pickle
import shutil

import dagster as dg
import numpy as np
import pandas as pd
import pytest

from wine_assets import model_format
from wine_assets import predict as predict_module
from wine_assets.definitions import ASSET_CHECKS, ASSETS
from wine_assets.features import fit_scaler
from wine_assets.params import ModelParams
from wine_assets.pipeline.resources import WineParamsResource
from wine_assets.predict import PredictionInputError, load_bundle, predict, prepare_features, read_input
from wine_assets.registry import ChecksumError, ModelRegistry, NoProductionModel
from wine_assets.training import train_model
from wine_assets.validation import FEATURE_COLUMNS, WineFeatures, collect_failures, fast_features_valid

from .support import tree_snapshot


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """The real pipeline run once: its registry, test set and evaluation."""
    folder = tmp_path_factory.mktemp("released")
    (folder / "params.yaml").write_text("paths: {artifacts_dir: artifacts, registry_dir: registry}\n")
    (folder / "instance").mkdir()
    with dg.instance_for_test(temp_dir=str(folder / "instance")) as instance:
        result = dg.materialize(
            [*ASSETS, *ASSET_CHECKS],
            instance=instance,
            resources={"params": WineParamsResource(params_file=str(folder / "params.yaml"))},
        )
        test_set = result.asset_value("test_set")
        metrics = result.asset_value("evaluation_metrics")
    return {"registry": folder / "registry", "test_set": test_set, "metrics": metrics}


@pytest.fixture
def registry_dir(released, tmp_path):
    """A private copy of the released registry, with an empty bundle cache."""
    target = tmp_path / "registry"
    shutil.copytree(released["registry"], target)
    predict_module.clear_cache()
    yield target
    predict_module.clear_cache()


def features(released):
    return released["test_set"].drop(columns="target")


@pytest.mark.component
def test_release_then_predict_reproduces_the_evaluation(released, registry_dir):
    result = predict(features(released), registry_dir=registry_dir)
    predictions = result.predictions
    truth = released["test_set"]["target"].to_numpy()
    assert result.version == 1
    assert len(predictions) == len(truth) == 36
    accuracy = float((predictions["predicted_class"].to_numpy() == truth).mean())
    assert accuracy == released["metrics"]["accuracy"]
    matrix = pd.crosstab(truth, predictions["predicted_class"]).reindex(
        index=[0, 1, 2], columns=[0, 1, 2], fill_value=0
    )
    assert matrix.to_numpy().tolist() == released["metrics"]["confusion_matrix"]
    probabilities = predictions[["probability_class_0", "probability_class_1", "probability_class_2"]].to_numpy()
    assert probabilities.sum(axis=1) == pytest.approx(np.ones(36))
    assert (predictions["predicted_label"] == "class_" + predictions["predicted_class"].astype(str)).all()
    assert result.warnings == []


@pytest.mark.component
def test_column_order_does_not_matter(released, registry_dir):
    frame = features(released)
    shuffled = frame[list(reversed(frame.columns))]
    pd.testing.assert_frame_equal(
        predict(shuffled, registry_dir=registry_dir).predictions, predict(frame, registry_dir=registry_dir).predictions
    )


@pytest.mark.component
def test_extra_columns_warn_or_are_refused_when_strict(released, registry_dir):
    frame = features(released).assign(vintage=2019)
    assert predict(frame, registry_dir=registry_dir).warnings == ["ignoring column(s) the model does not use: vintage"]
    with pytest.raises(PredictionInputError, match="does not use: vintage"):
        predict(frame, registry_dir=registry_dir, strict=True)


def _row_problem(frame, column, row, value):
    frame = frame.reset_index(drop=True)
    if isinstance(value, str):
        frame[column] = frame[column].astype(object)
    frame.loc[row, column] = value
    return frame


@pytest.mark.component
@pytest.mark.parametrize(
    ("column", "row", "value", "expected"),
    [
        ("hue", 4, np.nan, r"column 'hue', check not_nullable, row 4: nan"),
        ("proline", 7, 99999.0, r"column 'proline', check less_than_or_equal_to\(3360\.0\), row 7: 99999\.0"),
        ("ash", 2, "chalky", r"column 'ash', check coerce_dtype\('float64'\), row 2: chalky"),
        ("magnesium", 0, -5.0, r"column 'magnesium', check greater_than_or_equal_to\(35\.0\), row 0: -5\.0"),
    ],
    ids=["nan", "out_of_range", "non_numeric", "negative"],
)
def test_bad_values_name_the_column_and_the_row(released, registry_dir, column, row, value, expected):
    with pytest.raises(PredictionInputError, match=expected):
        predict(_row_problem(features(released), column, row, value), registry_dir=registry_dir)


@pytest.mark.component
def test_missing_columns_and_empty_input_are_refused(released, registry_dir):
    with pytest.raises(PredictionInputError, match="lacks column.s. flavanoids"):
        predict(features(released).drop(columns="flavanoids"), registry_dir=registry_dir)
    with pytest.raises(PredictionInputError, match="no rows"):
        predict(features(released).head(0), registry_dir=registry_dir)


@pytest.mark.unit
def test_no_model_deployed_says_to_run_the_release_job(tmp_path):
    with pytest.raises(NoProductionModel, match="run the release job"):
        load_bundle(registry_dir=tmp_path / "empty")


@pytest.mark.component
def test_a_tampered_model_is_never_unpickled(released, registry_dir, tmp_path):
    marker = tmp_path / "code-ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (registry_dir / "wine-classifier" / "v1" / "model.skops").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(ChecksumError):
        predict(features(released), registry_dir=registry_dir)
    assert not marker.exists()


@pytest.mark.component
def test_the_bundle_is_loaded_once_and_a_rollback_is_picked_up(released, registry_dir):
    first = load_bundle(registry_dir=registry_dir)
    assert load_bundle(registry_dir=registry_dir) is first
    # A second, different release (a small forest fitted on the test rows) becomes production.
    test_set = released["test_set"]
    scaler = fit_scaler(test_set)
    model = train_model(test_set, scaler, ModelParams(n_estimators=3)).model
    registry = ModelRegistry(registry_dir)
    manifest = registry.manifest(1)
    registry.publish(
        {"model.skops": model_format.dumps(model), "scaler.skops": model_format.dumps(scaler)},
        {"class_values": manifest["class_values"], "class_labels": manifest["class_labels"]},
    )
    assert load_bundle(registry_dir=registry_dir).version == 2
    assert predict(features(released), registry_dir=registry_dir).version == 2
    registry.set_production(1)
    assert load_bundle(registry_dir=registry_dir) is first
    assert predict(features(released), registry_dir=registry_dir, version="v2").version == 2


@pytest.mark.unit
def test_read_input_handles_csv_json_and_standard_input(wine_frame, tmp_path):
    frame = wine_frame.drop(columns="target").head(3)
    csv = tmp_path / "w.csv"
    frame.to_csv(csv, index=False)
    records = tmp_path / "w.json"
    records.write_text(frame.to_json(orient="records"))
    for loaded in (
        read_input(str(csv)),
        read_input(str(records)),
        read_input("-", csv.read_bytes()),
        read_input("-", records.read_bytes()),
    ):
        assert list(loaded.columns) == list(FEATURE_COLUMNS)
        assert loaded.to_numpy() == pytest.approx(frame.to_numpy())
    single = read_input("-", json.dumps(frame.iloc[0].to_dict()).encode())
    assert len(single) == 1
    with pytest.raises(PredictionInputError, match="must be a JSON list of records"):
        read_input("-", b"[1, 2]")
    with pytest.raises(PredictionInputError, match="is empty"):
        read_input("-", b"  \n")
    with pytest.raises(PredictionInputError, match="input file not found"):
        read_input(str(tmp_path / "absent.csv"))
    with pytest.raises(PredictionInputError, match="not valid JSON"):
        read_input("-", b"{oops")


@pytest.mark.unit
def test_the_fast_check_agrees_with_pandera(wine_frame):
    """fast_features_valid may only say yes where pandera says yes; it must say yes to clean data."""
    rng = np.random.default_rng(0)
    base = wine_frame.drop(columns="target").reset_index(drop=True)
    for _ in range(150):
        frame = base.sample(5, random_state=int(rng.integers(1_000_000))).reset_index(drop=True)
        kind = rng.integers(5)
        column = str(rng.choice(list(FEATURE_COLUMNS)))
        if kind == 1:
            frame.loc[int(rng.integers(5)), column] = np.nan
        elif kind == 2:
            frame.loc[int(rng.integers(5)), column] = 1e6
        elif kind == 3:
            frame.loc[int(rng.integers(5)), column] = -1.0
        elif kind == 4:
            frame[column] = frame[column].round().astype(int)  # ints are fine: pandera coerces them
        validated, failures = collect_failures(WineFeatures, frame)
        assert fast_features_valid(frame) == (not failures), (kind, column)
    assert prepare_features(base)[0].dtypes.unique().tolist() == [np.float64]


# -- the command, in-process (test_cli runs it once as a real process) ---------------------------
@pytest.mark.component
def test_cli_predicts_csv_to_csv_and_json_on_standard_input(released, registry_dir, tmp_path, wine_assets_cli):
    frame = features(released)
    csv = tmp_path / "wines.csv"
    frame.to_csv(csv, index=False)
    out = tmp_path / "predictions.csv"
    completed = wine_assets_cli(
        "predict", str(csv), "--registry", str(registry_dir), "--output", str(out), cwd=tmp_path
    )
    assert completed.returncode == 0, completed.stderr
    written = pd.read_csv(out)
    assert list(written.columns) == [
        "predicted_class",
        "predicted_label",
        "probability_class_0",
        "probability_class_1",
        "probability_class_2",
    ]
    accuracy = (written["predicted_class"].to_numpy() == released["test_set"]["target"].to_numpy()).mean()
    assert accuracy == released["metrics"]["accuracy"]

    records = frame.head(2).to_json(orient="records").encode()
    piped = wine_assets_cli(
        "predict", "-", "--format", "json", "--registry", str(registry_dir), stdin=records, cwd=tmp_path
    )
    assert piped.returncode == 0, piped.stderr
    rows = json.loads(piped.stdout)
    assert len(rows) == 2 and set(rows[0]) == set(written.columns)


@pytest.mark.component
def test_cli_bad_input_exits_2_and_writes_nothing(released, registry_dir, tmp_path, wine_assets_cli):
    bad = _row_problem(features(released), "alcohol", 3, np.nan)
    csv = tmp_path / "bad.csv"
    bad.to_csv(csv, index=False)
    out = tmp_path / "predictions.csv"
    out.write_text("earlier results\n")
    completed = wine_assets_cli(
        "predict", str(csv), "--registry", str(registry_dir), "--output", str(out), cwd=tmp_path
    )
    assert completed.returncode == 2
    assert "column 'alcohol', row 3: the value is missing (an empty cell)" in completed.stderr
    assert completed.stdout == ""
    assert out.read_text() == "earlier results\n"
    extra = features(released).head(3).assign(vintage=2019).to_csv(index=False).encode()
    strict = wine_assets_cli("predict", "-", "--strict", "--registry", str(registry_dir), stdin=extra, cwd=tmp_path)
    assert strict.returncode == 2 and "does not use: vintage (--strict)" in strict.stderr
    assert strict.stdout == ""
    lenient = wine_assets_cli("predict", "-", "--registry", str(registry_dir), stdin=extra, cwd=tmp_path)
    assert lenient.returncode == 0 and "warning: ignoring column(s) the model does not use: vintage" in lenient.stderr
    missing = wine_assets_cli("predict", "-", "--registry", str(registry_dir), stdin=b"x\n1\n", cwd=tmp_path)
    assert missing.returncode == 2 and "lacks column(s) alcohol" in missing.stderr


@pytest.mark.component
def test_cli_without_a_release_or_with_a_tampered_one_exits_1(released, registry_dir, tmp_path, wine_assets_cli):
    csv = tmp_path / "wines.csv"
    features(released).to_csv(csv, index=False)
    empty = wine_assets_cli("predict", str(csv), "--registry", str(tmp_path / "nothing"), cwd=tmp_path)
    assert empty.returncode == 1 and "run the release job" in empty.stderr
    (registry_dir / "wine-classifier" / "v1" / "scaler.skops").write_bytes(b"not the scaler")
    before = tree_snapshot(registry_dir)
    tampered = wine_assets_cli("predict", str(csv), "--registry", str(registry_dir), cwd=tmp_path)
    assert tampered.returncode == 1 and "does not match its sha256" in tampered.stderr
    assert tampered.stdout == ""
    assert tree_snapshot(registry_dir) == before


@pytest.mark.component
def test_cli_refuses_unreadable_text_repeated_columns_and_flags(released, registry_dir, tmp_path, wine_assets_cli):
    header = ",".join(FEATURE_COLUMNS).encode()
    latin = wine_assets_cli("predict", "-", "--registry", str(registry_dir), stdin=header + b"\n\xe9\n", cwd=tmp_path)
    assert latin.returncode == 2 and "is not UTF-8 text" in latin.stderr
    frame = features(released).head(2)
    doubled = frame.to_csv(index=False).replace("alcohol,", "alcohol,alcohol,", 1)
    doubled = "\n".join(
        [doubled.splitlines()[0]] + [line.split(",", 1)[0] + "," + line for line in doubled.splitlines()[1:]]
    )
    repeated = wine_assets_cli("predict", "-", "--registry", str(registry_dir), stdin=doubled.encode(), cwd=tmp_path)
    assert repeated.returncode == 2 and "has column(s) alcohol more than once" in repeated.stderr
    records = frame.to_dict("records")
    records[1]["hue"] = True
    flagged = wine_assets_cli(
        "predict", "-", "--registry", str(registry_dir), stdin=json.dumps(records).encode(), cwd=tmp_path
    )
    assert flagged.returncode == 2 and "column 'hue', row 1: true is a true/false value, not a number" in flagged.stderr


@pytest.mark.component
def test_cli_reports_an_unwritable_output_without_a_traceback(released, registry_dir, tmp_path, wine_assets_cli):
    csv = tmp_path / "wines.csv"
    features(released).head(2).to_csv(csv, index=False)
    folder = tmp_path / "a-folder"
    folder.mkdir()
    completed = wine_assets_cli(
        "predict", str(csv), "--registry", str(registry_dir), "--output", str(folder), cwd=tmp_path
    )
    assert completed.returncode == 1
    assert completed.stderr.startswith("wine-assets: error: ") and "Traceback" not in completed.stderr


# -- one number rule for `wine-assets predict` and `wine-assets serve` -----------------------------------
CELLS = [
    ("13.2", 13.2),
    (" 13.2 ", 13.2),
    ("+1.35e1", 13.5),
    (".135E2", 13.5),
    ("13.", 13.0),
    ("14", 14.0),
    ("1_00", "column 'alcohol', row 0: '1_00' is not a number"),
    ("١٣", "column 'alcohol', row 0: '١٣' is not a number"),
    ("0x10", "column 'alcohol', row 0: '0x10' is not a number"),
    ("1,5", "the CSV: row 0 has"),  # an unquoted comma is a second cell
    ("nan", "column 'alcohol', row 0: 'nan' is not a finite number"),
    ("-inf", "column 'alcohol', row 0: '-inf' is not a finite number"),
    ("1e999", "column 'alcohol', row 0: '1e999' is too large for a float"),
    ("", "column 'alcohol', row 0: the value is missing (an empty cell)"),
]


def _csv_with_alcohol(cell: str) -> bytes:
    row = ["13.2", "1.78", "2.14", "11.2", "100", "2.65", "2.76", "0.26", "1.28", "4.38", "1.05", "3.4", "1050"]
    return (",".join(FEATURE_COLUMNS) + "\n" + ",".join([cell, *row[1:]]) + "\n").encode()


@pytest.mark.unit
@pytest.mark.parametrize(("cell", "expected"), CELLS, ids=[repr(cell) for cell, _ in CELLS])
def test_a_csv_cell_is_read_by_the_same_rule_and_words_in_predict_and_in_serve(cell, expected):
    from wine_assets.serving.inputs import RequestError, parse_csv

    body = _csv_with_alcohol(cell)
    if isinstance(expected, float):
        assert read_input("-", body)["alcohol"].tolist() == [expected]
        assert parse_csv(body, 10).values[0, 0] == expected
        return
    with pytest.raises(RequestError) as served:
        parse_csv(body, 10)
    assert expected in served.value.message and served.value.status == 400
    if cell == "1,5":  # pandas reads the extra cell as an unnamed index: refused below, by the schema's column count
        return
    with pytest.raises(PredictionInputError) as predicted:
        read_input("-", body)
    assert str(predicted.value) == served.value.message


VALUES = [
    (13.2, 13.2),
    (14, 14.0),
    ("13.2", "column 'alcohol', row 0: '13.2' is text, not a number; send the number without quotes"),
    (True, "column 'alcohol', row 0: true is a true/false value, not a number"),
    (None, "column 'alcohol', row 0: the value is missing (null); send a number"),
    ([1], "column 'alcohol', row 0: a list is not a number"),
    (10**400, "column 'alcohol', row 0: " + "1" + "0" * 400 + " is too large for a float"),
]


@pytest.mark.unit
@pytest.mark.parametrize(("value", "expected"), VALUES, ids=["float", "int", "text", "flag", "null", "list", "huge"])
def test_a_json_value_is_read_by_the_same_rule_and_words_in_predict_and_in_serve(value, expected):
    from wine_assets.serving.inputs import RequestError, parse_mlflow_json

    record = dict(
        zip(FEATURE_COLUMNS, [value, 1.78, 2.14, 11.2, 100, 2.65, 2.76, 0.26, 1.28, 4.38, 1.05, 3.4, 1050], strict=True)
    )
    body = json.dumps([record]).encode()
    if isinstance(expected, float):
        assert read_input("-", body)["alcohol"].tolist() == [expected]
        assert parse_mlflow_json({"dataframe_records": [record]}, 10).values[0, 0] == expected
        return
    with pytest.raises(RequestError) as served:
        parse_mlflow_json({"dataframe_records": [record]}, 10)
    with pytest.raises(PredictionInputError) as predicted:
        read_input("-", body)
    assert str(predicted.value) == served.value.message == expected


@pytest.mark.component
def test_cli_predict_refuses_what_the_server_refuses(released, registry_dir, tmp_path, wine_assets_cli):
    """The review's case: "13.2" as text in JSON and 1_00 in a CSV were scored by the CLI."""
    frame = features(released).head(2)
    records = frame.to_dict("records")
    records[1]["alcohol"] = "13.2"
    text = wine_assets_cli("predict", "-", "--registry", str(registry_dir), stdin=json.dumps(records).encode())
    assert text.returncode == 2 and text.stdout == ""
    message = "column 'alcohol', row 1: '13.2' is text, not a number; send the number without quotes"
    assert text.stderr == f"wine-assets: error: {message}\n"
    underscored = frame.astype(object)
    underscored.loc[underscored.index[0], "magnesium"] = "1_00"
    csv = wine_assets_cli(
        "predict", "-", "--registry", str(registry_dir), stdin=underscored.to_csv(index=False).encode()
    )
    assert csv.returncode == 2 and csv.stdout == ""
    assert csv.stderr == "wine-assets: error: column 'magnesium', row 0: '1_00' is not a number\n"
