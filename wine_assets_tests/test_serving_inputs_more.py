"""The request parsers' less common refusals and warnings (wine_assets.serving.inputs), called directly:
each refusal is a 400 (or 415) whose message names the column, row or key that is wrong."""

from __future__ import annotations

import numpy as np
import pytest

from wine_assets.serving import inputs
from wine_assets.validation import FEATURE_COLUMNS

from .serving_support import ROW

pytestmark = pytest.mark.unit

OUTPUTS = ("predicted_class", "predicted_label", "probabilities")


def refusal(function, *args) -> inputs.RequestError:
    with pytest.raises(inputs.RequestError) as caught:
        function(*args)
    return caught.value


def csv_body(header: list[str], *rows: list[str]) -> bytes:
    return ("\n".join([",".join(header), *(",".join(row) for row in rows)]) + "\n").encode()


def per_feature(rows: int, **changed: dict) -> list[dict]:
    """One [rows] tensor per feature, each holding that feature's value of ROW."""
    tensors = []
    for name, value in zip(FEATURE_COLUMNS, ROW, strict=True):
        tensor = {"name": name, "shape": [rows], "datatype": "FP64", "data": [value] * rows}
        tensor.update(changed.get(name, {}))
        tensors.append(tensor)
    return tensors


# -- JSON ---------------------------------------------------------------------------------------
def test_json_nested_too_deeply_is_a_400_not_a_crash():
    error = refusal(inputs.decode_json, b"[" * 200_000)
    assert (error.status, error.error_code) == (400, "MALFORMED_REQUEST")
    assert error.message == "the JSON is nested too deeply"
    assert error.body() == {"error_code": "MALFORMED_REQUEST", "message": error.message, "error": error.message}


def test_split_column_names_must_be_text():
    document = {"dataframe_split": {"columns": list(range(13)), "data": [ROW]}}
    error = refusal(inputs.parse_mlflow_json, document, 10)
    assert error.status == 400 and error.reason == "shape"
    assert error.message == "dataframe_split: column names must be strings"


def test_split_unknown_keys_are_named():
    document = {"dataframe_split": {"columns": list(FEATURE_COLUMNS), "data": [ROW], "dtypes": {}, "orient": "x"}}
    error = refusal(inputs.parse_mlflow_json, document, 10)
    assert error.message == "dataframe_split has unknown key(s) dtypes, orient; it takes columns, data and index"


def test_split_extra_columns_are_ignored_with_a_warning():
    columns = ["note", *FEATURE_COLUMNS]
    features = inputs.parse_mlflow_json({"dataframe_split": {"columns": columns, "data": [[99.0, *ROW]]}}, 10)
    assert features.values.tolist() == [ROW]
    assert features.warnings == ["ignored column(s) the model does not use: note"]


def test_split_index_must_have_one_entry_per_row():
    document = {"dataframe_split": {"columns": list(FEATURE_COLUMNS), "data": [ROW, ROW], "index": [0]}}
    error = refusal(inputs.parse_mlflow_json, document, 10)
    assert error.message == "dataframe_split: 'index' must be a list with one entry per row (2)"
    assert error.rows == 2
    accepted = inputs.parse_mlflow_json(
        {**document, "dataframe_split": {**document["dataframe_split"], "index": [4, 5]}}, 10
    )
    assert accepted.rows == 2


def test_inference_params_are_refused():
    error = refusal(inputs.parse_mlflow_json, {"instances": [ROW], "params": {"temperature": 1}}, 10)
    assert error.message == "this model takes no inference params; leave 'params' out or empty"
    assert inputs.parse_mlflow_json({"instances": [ROW], "params": {}}, 10).values.tolist() == [ROW]


def test_inputs_as_columns_need_lists_and_ignore_unknown_columns():
    columns = {name: [value] for name, value in zip(FEATURE_COLUMNS, ROW, strict=True)}
    error = refusal(inputs.parse_mlflow_json, {"inputs": {**columns, "alcohol": 13.2, "ash": 2.1}}, 10)
    assert error.message == "inputs: column(s) alcohol, ash must be lists of values"
    features = inputs.parse_mlflow_json({"inputs": {**columns, "batch": ["a"]}}, 10)
    assert features.values.tolist() == [ROW]  # the unknown column's text is never read as a number
    assert features.warnings == ["ignored column(s) the model does not use: batch"]


# -- CSV ----------------------------------------------------------------------------------------
def test_csv_that_is_not_utf8_names_the_byte():
    error = refusal(inputs.parse_csv, b"alcohol\n\xff\xfe\n", 10)
    assert error.error_code == "MALFORMED_REQUEST"
    assert error.message.startswith("the CSV is not UTF-8 text (invalid start byte at byte 8)")


@pytest.mark.parametrize(
    ("body", "words"),
    [
        (b"alcohol\r x,y\n", "new-line character seen in unquoted field"),
        (b"a" * 200_000 + b"\n1\n", "field larger than field limit"),
    ],
)
def test_csv_the_reader_cannot_read_is_a_400(body, words):
    error = refusal(inputs.parse_csv, body, 10)
    assert error.error_code == "MALFORMED_REQUEST"
    assert error.message.startswith("the body is not a readable CSV: ") and words in error.message


def test_csv_rows_must_match_the_header():
    header = list(FEATURE_COLUMNS)
    body = csv_body(header, [str(v) for v in ROW], [str(v) for v in ROW[:5]])
    error = refusal(inputs.parse_csv, body, 10)
    assert error.message == "the CSV: row 1 has 5 cells; the header has 13"
    assert error.rows == 2


def test_csv_extra_columns_are_ignored_with_a_warning():
    body = csv_body(["id", *FEATURE_COLUMNS], ["wine-7", *map(str, ROW)])
    features = inputs.parse_csv(body, 10)
    assert features.values.tolist() == [ROW]
    assert features.warnings == ["ignored column(s) the model does not use: id"]


def test_csv_numbers_beyond_float_range_name_the_cell():
    cells = [str(v) for v in ROW]
    cells[4] = "1e999"
    error = refusal(inputs.parse_csv, csv_body(list(FEATURE_COLUMNS), cells), 10)
    assert error.message == "column 'magnesium', row 0: '1e999' is too large for a float"
    assert error.reason == "type"


def test_invocations_refuse_other_media_types():
    error = refusal(inputs.parse_invocations, b"<wine/>", "application/xml; charset=utf-8", 10)
    assert (error.status, error.error_code) == (415, "UNSUPPORTED_MEDIA_TYPE")
    assert error.message == "'application/xml; charset=utf-8' is not accepted here; send application/json or text/csv"
    assert refusal(inputs.parse_invocations, b"", None, 10).message.startswith("no Content-Type is not accepted")


# -- Open Inference Protocol --------------------------------------------------------------------
def test_tensor_data_nested_deeper_than_its_shape():
    tensor = {"name": "x", "shape": [1, 13], "datatype": "FP64", "data": [[[value] for value in ROW]]}
    error = refusal(inputs.parse_infer, {"inputs": [tensor]}, 10, OUTPUTS)
    assert error.message == "input 'x': 'data' is nested deeper than the shape [1, 13]"


def test_more_tensors_than_any_request_needs():
    tensors = [{"name": f"f{index}", "shape": [1], "datatype": "FP64", "data": [1.0]} for index in range(1001)]
    error = refusal(inputs.parse_infer, {"inputs": tensors}, 10, OUTPUTS)
    assert error.message == "1001 inputs; the model takes one [N, 13] or 13 [N]"


def test_per_feature_tensors_must_be_columns():
    tensors = per_feature(2, ash={"shape": [1, 2]})
    error = refusal(inputs.parse_infer, {"inputs": tensors}, 10, OUTPUTS)
    assert error.message == "input 'ash': shape [1, 2] is not [N] or [N, 1]"


def test_per_feature_tensors_must_have_equal_rows():
    tensors = per_feature(2, proline={"shape": [3], "data": [1050.0] * 3})
    error = refusal(inputs.parse_infer, {"inputs": tensors}, 10, OUTPUTS)
    assert error.message.startswith("the inputs have different numbers of rows (alcohol: 2, ")
    assert error.message.endswith("proline: 3)")


def test_per_feature_column_tensors_are_read_in_training_order():
    tensors = list(reversed(per_feature(2, magnesium={"shape": [2, 1], "data": [[100.0], [101.0]]})))
    request = inputs.parse_infer({"id": "r1", "inputs": tensors, "outputs": [{"name": "probabilities"}]}, 10, OUTPUTS)
    expected = np.array([ROW, ROW])
    expected[1, FEATURE_COLUMNS.index("magnesium")] = 101.0
    assert np.array_equal(request.features.values, expected)
    assert (request.id, request.outputs) == ("r1", ["probabilities"])
