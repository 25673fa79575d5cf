"""The benchmark script keeps working: a smoke run (10^3 rows, one run of everything).

This measures nothing; `make bench` does, and writes benchmarks/RESULTS.md. The smoke run
leaves out section 0 (fresh clones installed from PyPI) and the multiprocess executor (a
process per step; test_cli runs that same command), and coverage is not measured in its
processes: they run code that the other tests cover, and tracing them only makes this, the
suite's longest test, longer.
"""

import os
import shutil
import subprocess
import sys

import pandas as pd
import pytest

from .conftest import REPO_ROOT

pytestmark = pytest.mark.slow


def test_the_synthetic_data_passes_the_schema_and_keeps_the_classes():
    sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
    try:
        from synthetic import synthetic_frame
    finally:
        sys.path.remove(str(REPO_ROOT / "benchmarks"))
    from wine_assets.validation import WineSchema, validate_frame

    frame = synthetic_frame(5000, seed=3)
    assert len(frame) == 5000
    validate_frame(frame, WineSchema)
    assert set(frame["target"]) == {0, 1, 2}
    pd.testing.assert_frame_equal(frame, synthetic_frame(5000, seed=3))
    assert not frame.equals(synthetic_frame(5000, seed=4))


def test_the_benchmark_smoke_run_writes_every_section(tmp_path):
    output = tmp_path / "RESULTS.md"
    completed = subprocess.run(
        [sys.executable, str(REPO_ROOT / "benchmarks" / "run.py"), "--smoke", "--skip-setup", "--output", str(output)],
        cwd=tmp_path,
        env={key: value for key, value in os.environ.items() if not key.startswith("COVERAGE_PROCESS_")},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    text = output.read_text()
    for heading in ("## 1. Pipeline overhead", "## 2. Prediction", "## 3. Scale"):
        assert heading in text
    assert "## 0. Set-up" not in text  # --skip-setup
    assert "| multiprocess executor (CLI with `-c`) | not run |" in text
    assert "Ratio CLI / bare:" in text and "per step" in text
    assert "| 1,000 rows |" in text and "training (`wine_model`)" in text
    assert "Largest size run here within 10 minutes per run: **1,000 rows**" in text
    assert "smoke run" in text
    assert "## 4. Scale-out: instance storage, executors, training on a cluster\n\nNot run (`--smoke`" in text
    assert "## 5. Serving: `wine-assets serve` under load" in text
    if shutil.which("wrk") or os.environ.get("WINE_ASSETS_REQUIRE_SERVICES") == "1":
        assert "- the 178 wines: same classes, largest probability difference" in text
        assert "| ours | 1 |" in text and "| plain FastAPI + predict() | 1 |" in text
    else:
        assert "Not run (wrk is not installed" in text
    assert "## 6. Experiments: the grid, sequential and in parallel" in text
    assert "| `wine-assets experiment run --workers 2` |" in text and "Dagster's cost per run" in text
    assert "== wine: decision:" in text
