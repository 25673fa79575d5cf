"""The column limit on every file of rows the project reads: data.source and the experiment
datasets, `registry evaluation-set replace` and `wine-assets predict`. A too-wide file is refused
from its header line, naming the file, the columns found and the limit, before pandas parses it."""

from __future__ import annotations

import json
import os

import pytest

from wine_assets.ingestion import (
    MAX_CSV_HEADER_BYTES,
    MAX_INPUT_COLUMNS,
    IngestionError,
    csv_file_header,
    csv_header,
    load_raw,
    read_csv_source,
)
from wine_assets.params import load_params
from wine_assets.predict import PredictionInputError, read_input
from wine_assets.registry import ModelRegistry
from wine_assets.validation import FEATURE_COLUMNS

WIDE = 100_000  # the width the review tried: over a minute in pandas before the limit


def wide_csv(path, columns=WIDE, rows=2):
    """A CSV of ``columns`` columns (the wine features first, then filler) and ``rows`` rows."""
    names = [*FEATURE_COLUMNS, *(f"x{index}" for index in range(columns - len(FEATURE_COLUMNS)))]
    row = ",".join(["1.0"] * columns)
    path.write_text(",".join(names) + "\n" + "\n".join([row] * rows) + "\n")
    return path


def too_wide(where, columns=WIDE):
    return f"{where}: the header has {columns} columns; at most {MAX_INPUT_COLUMNS} are read (the wine data has 14)"


@pytest.mark.unit
def test_the_header_is_counted_with_csv_quoting_and_the_limit_is_exact(tmp_path):
    assert csv_header(b'\xef\xbb\xbfa,"b, still b","c\nc"\n1,2,3\n', "x") == ["a", "b, still b", "c\nc"]
    assert csv_header(b"a,b", "x") == ["a", "b"]  # a header alone, no line end
    assert csv_header(b"", "x") == []  # an empty file is left to the reader, which names it
    at_limit = wide_csv(tmp_path / "at.csv", MAX_INPUT_COLUMNS)
    assert len(csv_file_header(at_limit, "at.csv")) == MAX_INPUT_COLUMNS
    over = wide_csv(tmp_path / "over.csv", MAX_INPUT_COLUMNS + 1)
    with pytest.raises(ValueError) as error:
        csv_file_header(over, "over.csv")
    assert str(error.value) == too_wide("over.csv", MAX_INPUT_COLUMNS + 1)


@pytest.mark.unit
def test_an_endless_header_line_is_refused_after_a_bounded_read(tmp_path):
    # 4 GiB with no line end (a sparse file: it takes no room): refused from its first bytes,
    # never read whole. A quote left open past the limit is the same endless first record.
    endless = tmp_path / "endless.csv"
    with endless.open("wb") as stream:
        stream.write(b"alcohol,")
        stream.truncate(4 << 30)
    expected = f"the header line is longer than {MAX_CSV_HEADER_BYTES} bytes"
    with pytest.raises(IngestionError) as error:
        read_csv_source(endless)
    assert str(error.value).startswith(f"data.source: data file {endless}: {expected}")
    assert str(error.value).endswith(f"at most {MAX_INPUT_COLUMNS} columns are read (the wine data has 14)")
    quoted = tmp_path / "quoted.csv"
    quoted.write_bytes(b'alcohol,"' + b"x\n" * (MAX_CSV_HEADER_BYTES // 2 + 1))
    with pytest.raises(ValueError, match=f"quoted.csv: {expected}"):
        csv_file_header(quoted, "quoted.csv")
    # Many short names, no line end: the same refusal, from the count of bytes.
    names = b",".join(b"c%d" % index for index in range(MAX_CSV_HEADER_BYTES // 4))
    assert len(names) > MAX_CSV_HEADER_BYTES
    with pytest.raises(ValueError) as error:
        csv_header(names, "names.csv")
    assert str(error.value) == (
        f"names.csv: {expected}; at most {MAX_INPUT_COLUMNS} columns are read (the wine data has 14)"
    )
    assert csv_header(b'a,"b\n', "t") == ["a", "b\n"]  # a short file: the reader that follows judges it
    # A header line of exactly the limit, then its line end, is read.
    long_names = [b"n%04d" % index + b"a" * 1043 for index in range(MAX_INPUT_COLUMNS - 1)]
    last = MAX_CSV_HEADER_BYTES - len(b",".join(long_names)) - 1
    exact = tmp_path / "exact.csv"
    exact.write_bytes(b",".join([*long_names, b"z" * last]) + b"\n1\n")
    assert exact.read_bytes().index(b"\n") == MAX_CSV_HEADER_BYTES
    assert len(csv_file_header(exact, "exact.csv")) == MAX_INPUT_COLUMNS


@pytest.mark.unit
def test_a_wide_data_source_and_experiment_dataset_are_refused_naming_the_key(write_params, tmp_path):
    wide = wide_csv(tmp_path / "wide.csv")
    params = load_params(
        write_params(data={"source": str(wide)}, experiments={"datasets": {"wide": str(wide), "wine": "builtin"}})
    )
    with pytest.raises(IngestionError) as error:
        load_raw(params)
    assert str(error.value) == too_wide(f"data.source: data file {wide}")
    with pytest.raises(IngestionError) as error:
        load_raw(params, dataset="wide")
    assert str(error.value) == too_wide(f"experiments.datasets.wide: data file {wide}")


@pytest.mark.component
def test_the_evaluation_set_is_not_replaced_by_a_wide_csv(write_params, tmp_path, wine_assets_cli):
    params = write_params()
    wide = wide_csv(tmp_path / "wide.csv")
    refused = wine_assets_cli(
        "registry", "evaluation-set", "replace", wide, "--reason", "wider", env={"WINE_ASSETS_PARAMS": str(params)}
    )
    assert refused.returncode == 2
    expected = too_wide(f"evaluation set: data file {wide}")
    assert refused.stderr.strip().splitlines() == [f"wine-assets: error: {expected}"]
    assert ModelRegistry(tmp_path / "registry").evaluation_set() is None


@pytest.mark.unit
def test_predict_refuses_a_wide_csv_and_json_records_naming_the_input(tmp_path):
    wide = wide_csv(tmp_path / "wide.csv")
    with pytest.raises(PredictionInputError) as error:
        read_input(str(wide))
    assert str(error.value) == too_wide(f"the input {wide}")
    with pytest.raises(PredictionInputError) as error:
        read_input("-", wide.read_bytes())
    assert str(error.value) == too_wide("the input on standard input")
    record = {name: 1.0 for name in FEATURE_COLUMNS}
    many = [{**record, **{f"extra_{index}": 1.0 for index in range(MAX_INPUT_COLUMNS - 13)}}, {"one_more": 2.0}]
    with pytest.raises(PredictionInputError) as error:
        read_input("-", json.dumps(many).encode())
    assert str(error.value) == (
        f"the input on standard input: its records name more than {MAX_INPUT_COLUMNS} columns (at least "
        f"{MAX_INPUT_COLUMNS + 1}); at most {MAX_INPUT_COLUMNS} are read (the wine data has 14)"
    )
    assert read_input("-", json.dumps(many[:1]).encode()).shape == (1, MAX_INPUT_COLUMNS)
    at_limit = read_input(str(wide_csv(tmp_path / "at.csv", MAX_INPUT_COLUMNS)))
    assert at_limit.shape == (2, MAX_INPUT_COLUMNS)


@pytest.mark.component
def test_the_predict_command_refuses_a_wide_csv_in_one_line_and_writes_nothing(tmp_path, wine_assets_cli):
    wide = wide_csv(tmp_path / "wide.csv")
    output = tmp_path / "predictions.csv"
    output.write_text("earlier results\n")
    completed = wine_assets_cli("predict", wide, "--registry", tmp_path / "registry", "--output", output)
    assert completed.returncode == 2 and completed.stdout == ""
    assert completed.stderr.strip().splitlines() == [f"wine-assets: error: {too_wide(f'the input {wide}')}"]
    assert output.read_text() == "earlier results\n"
    assert not os.path.exists(tmp_path / "registry")
