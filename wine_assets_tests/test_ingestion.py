import hashlib

import pytest

from wine_assets.ingestion import (
    FINGERPRINT_ATTR,
    IngestionError,
    class_counts,
    fingerprint_frame,
    load_raw,
    read_csv_source,
)
from wine_assets.params import load_params
from wine_assets.validation import FEATURE_COLUMNS


@pytest.mark.unit
def test_builtin_source_is_the_wine_data_set(write_params):
    raw = load_raw(load_params(write_params()))
    assert raw.frame.shape == (178, 14)
    assert list(raw.frame.columns) == [*FEATURE_COLUMNS, "target"]
    assert class_counts(raw.frame) == {"0": 59, "1": 71, "2": 48}
    assert raw.source == "builtin"
    assert raw.frame.attrs[FINGERPRINT_ATTR] == raw.fingerprint == fingerprint_frame(raw.frame)


@pytest.mark.unit
def test_builtin_fingerprint_follows_the_values(wine_frame):
    changed = wine_frame.copy()
    changed.loc[0, "alcohol"] += 0.01
    assert fingerprint_frame(wine_frame) == fingerprint_frame(wine_frame.copy())
    assert fingerprint_frame(changed) != fingerprint_frame(wine_frame)


@pytest.mark.unit
def test_csv_source_is_read_and_fingerprinted_by_its_bytes(write_params, write_csv, wine_frame):
    csv = write_csv()
    raw = load_raw(load_params(write_params(data={"source": csv.name})))
    assert raw.source == str(csv)
    assert raw.fingerprint == hashlib.sha256(csv.read_bytes()).hexdigest()
    assert raw.frame.shape == wine_frame.shape
    assert raw.frame["alcohol"].tolist() == pytest.approx(wine_frame["alcohol"].tolist())


@pytest.mark.unit
def test_missing_file_names_file_and_key(tmp_path):
    with pytest.raises(IngestionError, match=r"data\.source: data file not found: .*absent\.csv"):
        read_csv_source(tmp_path / "absent.csv")


@pytest.mark.unit
def test_empty_file_names_file_and_key(tmp_path):
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(IngestionError, match=r"data\.source: data file .*empty\.csv is empty"):
        read_csv_source(empty)


@pytest.mark.unit
def test_header_only_file_has_no_rows(tmp_path):
    header = tmp_path / "header.csv"
    header.write_text(",".join([*FEATURE_COLUMNS, "target"]) + "\n")
    with pytest.raises(IngestionError, match="has a header but no data rows"):
        read_csv_source(header)


@pytest.mark.unit
def test_folder_and_binary_files_are_refused(tmp_path):
    with pytest.raises(IngestionError, match="is a folder, not a CSV file"):
        read_csv_source(tmp_path)
    binary = tmp_path / "bin.csv"
    binary.write_bytes(b"\xff\xfe\x00a,b\n\x81,\x82\n")
    with pytest.raises(IngestionError, match="bin.csv"):
        read_csv_source(binary)
