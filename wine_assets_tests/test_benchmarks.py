"""The benchmarks' own code (benchmarks/, `make bench`), section by section, in-process on tiny inputs.

These tests measure nothing. They check the code that measures: the report's tables, ratios and
targets computed from given timings, wrk's output parsed, the helpers that assemble the results
file, the synthetic data, and the pieces that a section runs in processes of its own (the bare
script, the in-process materialize, the no-op chains, the plain FastAPI baseline, the experiment
workspace), called here directly. The whole smoke run (`python -m benchmarks.run --smoke
--skip-setup`: minutes, and wrk for section 5) is a benchmark, not a test.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import re
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from benchmarks import experiments as bench_experiments
from benchmarks import run as bench
from benchmarks import serving as bench_serving
from benchmarks.synthetic import linear_frame, synthetic_frame, write_csv
from wine_assets.experiments import variants_of
from wine_assets.params import load_params
from wine_assets.predict import predict
from wine_assets.registry import ModelRegistry
from wine_assets.validation import BOUNDS, FEATURE_COLUMNS, WineSchema, validate_frame

from .support import REPO_ROOT

STEP_KEYS = [step for step, _ in bench.STAGES]
RESULTS = "# Benchmark results\n\nintro\n\n## 1. A\n\nold a\n\n## 2. B\n\nold b\n"

# wrk 4's report with --latency (src/wrk.c: print_stats_latency pads one-letter units with a space)
WRK_ONE_CONNECTION = """\
Running 1s test @ http://127.0.0.1:41234/invocations
  1 threads and 1 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   726.54us  160.34us   4.10ms   93.60%
    Req/Sec     1.38k    58.71     1.45k    80.00%
  Latency Distribution
     50%  693.00us
     75%  749.00us
     90%  828.00us
     99%    1.29ms
  1373 requests in 1.00s, 394.21KB read
Requests/sec:   1372.41
Transfer/sec:    394.03KB
"""
WRK_WITH_ERRORS = """\
Running 10s test @ http://127.0.0.1:41234/invocations
  2 threads and 64 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency    61.20ms   12.02ms    1.02s    95.10%
    Req/Sec   520.33     40.11   610.00     70.00%
  Latency Distribution
     50%   59.80ms
     75%   63.10ms
     90%   70.45ms
     99%    1.02s{pad}
  10377 requests in 10.01s, 2.91MB read
  Socket errors: connect 0, read 2, write 0, timeout 3
  Non-2xx or 3xx responses: 5
Requests/sec:   1036.71
Transfer/sec:    297.62KB
""".format(pad=" ")


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Section 5's registry (v1 in production: the default forest on the built-in training split)."""
    return bench_serving.make_registry(tmp_path_factory.mktemp("bench-registry"))


def text_of(lines: list[str]) -> str:
    return "\n".join(lines)


# -- the results file ----------------------------------------------------------------------------
@pytest.mark.unit
def test_times_are_shown_in_milliseconds_below_a_tenth_of_a_second():
    assert bench.fmt(0.0123) == "12.30 ms"
    assert bench.fmt(0.09999) == "99.99 ms"
    assert bench.fmt(0.1) == "0.10 s"
    assert bench.fmt(62.5) == "62.50 s"
    assert bench.median([4.0, 1.0, 3.0, 2.0]) == 2.5
    assert bench.times_cell([1.0, 3.0, 2.0]) == "2.00 s | 1.0, 3.0, 2.0"


@pytest.mark.unit
def test_replace_section_swaps_one_section_and_keeps_the_others():
    assert bench.replace_section(RESULTS, "## 1. A", ["## 1. A", "", "new a", ""]) == (
        "# Benchmark results\n\nintro\n\n## 1. A\n\nnew a\n\n## 2. B\n\nold b\n"
    )
    assert bench.replace_section(RESULTS, "## 2. B", ["## 2. B", "", "new b", ""]) == (
        "# Benchmark results\n\nintro\n\n## 1. A\n\nold a\n\n## 2. B\n\nnew b\n"
    )


@pytest.mark.unit
def test_replace_section_appends_a_section_the_file_lacks():
    assert bench.replace_section(RESULTS, "## 3. C", ["## 3. C", "", "c", ""]) == RESULTS + "\n## 3. C\n\nc\n"


@pytest.mark.unit
def test_only_section_measures_in_a_scratch_folder_and_replaces_its_section(tmp_path, capsys):
    output = tmp_path / "RESULTS.md"
    output.write_text(RESULTS)
    scratches = []

    def measure(scratch: Path) -> list[str]:
        assert scratch.is_dir() and not any(scratch.iterdir())
        scratches.append(scratch)
        return ["## 2. B", "", "new b", ""]

    assert bench.only_section("python benchmarks/run.py --only-b", output, "## 2. B", measure) == 0
    assert len(scratches) == 1 and not scratches[0].exists()
    text = output.read_text()
    assert text.startswith("# Benchmark results\n\nintro\n\n## 1. A\n\nold a\n\n## 2. B\n\n")
    assert text.endswith("\n\nnew b\n") and "old b" not in text
    assert re.search(
        r"\n\nMeasured by `python benchmarks/run\.py --only-b` on \d{4}-\d\d-\d\d \d\d:\d\d UTC, in \d+\.\d minutes "
        r"\(the other sections by the run named above\)\.\n\nnew b\n",
        text,
    )
    assert capsys.readouterr().out == f"section 2 written to {output}\n"


@pytest.mark.unit
def test_the_report_names_the_command_the_time_and_the_machine_then_the_sections():
    sections = [["## 1. A", "", "a", ""], [], ["## 2. B", "", "b", ""]]
    smoke = bench.report_text("python benchmarks/run.py --smoke", 0.0, 90.0, True, sections)
    assert smoke.startswith(
        "# Benchmark results\n\nMade by `python benchmarks/run.py --smoke` on 1970-01-01 00:00 UTC, in 1.5 minutes "
        "(smoke run: one run each, not a measurement).\n\nThe machine:\n\n- CPU: "
    )
    assert smoke.endswith("\n\n## 1. A\n\na\n\n## 2. B\n\nb\n")
    assert "\n".join(bench.machine_lines()) in smoke
    measured = bench.report_text("python benchmarks/run.py", 0.0, 600.0, False, sections)
    assert "in 10.0 minutes.\n" in measured and "smoke run" not in measured


@pytest.mark.unit
def test_the_machine_lines_name_the_cores_python_and_the_libraries():
    lines = bench.machine_lines()
    assert len(lines) == 4
    assert lines[0].startswith("- CPU: ") and lines[0].endswith(f", {os.cpu_count()} logical cores")
    assert lines[1].startswith("- memory: ") and lines[2] == f"- system: {platform.platform()}"
    assert lines[3].startswith(f"- Python {platform.python_version()}; dagster {importlib.metadata.version('dagster')}")
    assert f"scikit-learn {importlib.metadata.version('scikit-learn')}" in lines[3]


@pytest.mark.unit
def test_smoke_plans_one_run_of_everything_and_sizes_read_powers_of_ten():
    parser = bench.build_parser()
    assert parser.parse_args([]).output == REPO_ROOT / "benchmarks" / "RESULTS.md"
    smoke = parser.parse_args(["--smoke", "--sizes", "1e3,2e4"])
    assert smoke.sizes == [1000, 20000]
    assert bench.plan_for(smoke) == bench.Plan(
        runs=1,
        multiprocess_runs=0,
        noop_runs=1,
        cold_runs=1,
        sizes=[1000],
        reps={1: 5, 1000: 3},
        large_rows=1000,
        large_runs=1,
        setup_runs=(1, 0),
    )
    measured = bench.plan_for(parser.parse_args(["--runs", "3", "--sizes", "1e3,1e4"]))
    assert (measured.runs, measured.noop_runs, measured.multiprocess_runs, measured.cold_runs) == (3, 3, 2, 5)
    assert measured.sizes == [1000, 10000] and measured.reps == {1: 300, 1000: 100, 100_000: 15}
    assert (measured.large_rows, measured.large_runs, measured.setup_runs) == (100_000, 3, (2, 1))


@pytest.mark.unit
def test_a_workspace_has_its_own_params_instance_and_environment(tmp_path):
    workspace = bench.Workspace(
        tmp_path / "w", {"data": {"source": "wine.csv"}, "model": {"n_jobs": 2}, "paths": {"registry_dir": "reg"}}
    )
    assert yaml.safe_load(workspace.params_file.read_text()) == {
        "paths": {"artifacts_dir": "artifacts", "registry_dir": "reg"},
        "data": {"source": "wine.csv"},
        "model": {"n_jobs": 2},
    }
    assert yaml.safe_load((workspace.home / "dagster.yaml").read_text()) == {"telemetry": {"enabled": False}}
    params = load_params(workspace.params_file)  # the project's own schema accepts it
    assert params.data_source_path == workspace.root / "wine.csv"
    assert params.registry_dir == workspace.root / "reg" and params.model.n_jobs == 2
    env = workspace.env
    assert env["DAGSTER_HOME"] == str(workspace.home) and env["WINE_ASSETS_PARAMS"] == str(workspace.params_file)
    assert env["PYTHONWARNINGS"] == "ignore"


# -- 0. set-up (the clones, installs and PyPI are the benchmark's; their environment and table here) --
@pytest.mark.unit
def test_a_fresh_clone_gets_none_of_this_sessions_venv_uv_pip_or_dagster_settings():
    session = {
        "PATH": "/usr/bin",
        "HOME": "/home/user",
        "VIRTUAL_ENV": "/work/.venv",
        "VIRTUAL_ENV_PROMPT": "(venv)",
        "UV_CACHE_DIR": "/cache/uv",
        "UV_PROJECT_ENVIRONMENT": ".venv",
        "PIP_INDEX_URL": "https://example.invalid/simple",
        "DAGSTER_HOME": "/work/.dagster_home",
        "WINE_ASSETS_PARAMS": "/work/params.yaml",
        "PYTHONWARNINGS": "error",
    }
    assert bench.setup_env(session) == {"PATH": "/usr/bin", "HOME": "/home/user", "PYTHONWARNINGS": "ignore"}
    assert session["DAGSTER_HOME"] == "/work/.dagster_home"  # the session's own environment is left alone


@pytest.mark.unit
def test_the_setup_table_shows_medians_every_run_and_the_target():
    lines = bench.setup_lines("abc1234", 2, [50.0, 70.0], [30.0, 40.0], [10.0, 12.0], [])
    text = text_of(lines)
    assert lines[0] == "## 0. Set-up"
    assert "fresh `git clone` of this commit (abc1234)" in text and "; 2 clone(s)." in text
    assert "| first `make run` of a fresh clone, install included | 60.00 s | 50.0, 70.0 |" in lines
    assert "| `make install` into a new `.venv`, uv cache empty | 35.00 s | 30.0, 40.0 |" in lines
    assert "| `make install` into a new `.venv`, uv cache warm | 11.00 s | 10.0, 12.0 |" in lines
    assert "new venv, pip cache empty | not run |  |" in text
    assert "Target: the first `make run` under 60 s (now 60.00 s)." in lines
    with_pip = text_of(bench.setup_lines("abc1234", 1, [40.0], [30.0], [10.0], [95.0]))
    assert "new venv, pip cache empty | 95.00 s | 95.0 |" in with_pip


# -- 1. pipeline overhead -------------------------------------------------------------------------
@pytest.mark.unit
def test_the_scripts_and_programs_the_sections_start_exist():
    assert Path(bench.BARE[1]) == REPO_ROOT / "benchmarks" / "bare_pipeline.py" and Path(bench.BARE[1]).is_file()
    assert Path(bench.INPROCESS[1]).is_file() and Path(bench.NOOP[4]).is_file()
    assert Path(bench.CLI[0]).is_file() and (bench.BIN / "wine-assets").is_file()
    assert bench.CLI[1:] == ["asset", "materialize", "-m", "wine_assets", "--select", "*"]


@pytest.mark.unit
def test_the_work_seconds_and_the_json_report_are_read_from_the_scripts_output():
    assert bench.work_seconds("UserWarning: something\nwork_seconds 1.2345\n") == 1.2345
    stdout = 'a log line\n{"not": "this"}\n{"success": true, "materialize_seconds": 2.5}\n\n'
    assert bench.last_json(stdout) == {"success": True, "materialize_seconds": 2.5}


@pytest.mark.unit
def test_the_overhead_section_computes_the_ratios_and_the_cost_per_step():
    times = {"bare": [2.0, 2.2, 1.8], "cli": [3.0, 3.3, 2.7], "inprocess": [2.5, 2.5, 2.5]}
    noop = {1: [1.0], 21: [1.5]}
    lines = bench.overhead_lines(3, times, [], [1.0, 1.0, 1.0], [1.5, 1.5, 1.5], [1.2, 1.2, 1.2], noop)
    text = text_of(lines)
    assert lines[0] == "## 1. Pipeline overhead" and "3 runs of each, alternating." in text
    assert "| bare script, whole process | 2.00 s | 2.00, 2.20, 1.80 |" in lines
    assert "| `dagster asset materialize -m wine_assets --select '*'` | 3.00 s | 3.00, 3.30, 2.70 |" in lines
    assert "| in-process `dagster.materialize()`, whole process | 2.50 s | 2.50, 2.50, 2.50 |" in lines
    assert "| multiprocess executor (CLI with `-c`) | not run |  |" in lines
    assert (
        "**Ratio CLI / bare: 1.50x** (target: at most 1.5x). In-process process / bare: 1.25x. "
        "Multiprocess / bare: not run." in lines
    )
    assert "the bare script's work takes 1.00 s; the first `materialize()` call for the same graph takes 1.50 s" in text
    assert "takes 1.20 s (1.20x)." in text
    assert "1 step 1.00 s, 21 steps 1.50 s, so **25.00 ms per step** and about 1.00 s for starting" in text
    multiprocess = text_of(bench.overhead_lines(3, times, [4.0, 4.4], [1.0], [1.5], [1.2], noop))
    assert "| multiprocess executor (CLI with `-c`) | 4.20 s | 4.00, 4.40 |" in multiprocess
    assert "Multiprocess / bare: 2.10x." in multiprocess


@pytest.mark.unit
def test_the_overhead_at_size_line():
    assert bench.overhead_at_size_lines(100_000, 3, 4.0, 5.0) == [
        "The same comparison on 100,000 synthetic rows (see Scale), 3 runs each, default params: "
        "bare 4.00 s, CLI 5.00 s, **ratio 1.25x**.",
        "",
    ]


@pytest.mark.unit
def test_the_bare_script_does_the_pipelines_work_and_releases_a_model_that_section_2_loads(tmp_path):
    from benchmarks import bare_pipeline

    workspace = bench.Workspace(tmp_path / "bare", {"model": {"n_estimators": 10}})
    accuracy = bare_pipeline.main(str(workspace.params_file))
    assert 0.8 <= accuracy <= 1.0
    artifacts = workspace.root / "artifacts"
    for name in ("model.skops", "scaler.skops", "plots/confusion_matrix.png", "plots/feature_importance.png"):
        assert (artifacts / name).is_file(), name
    assert json.loads((artifacts / "metrics.json").read_text())["accuracy"] == accuracy
    registry = workspace.root / "registry"
    assert ModelRegistry(registry).production_version() == 1
    measured = bench.measure_prediction(registry, {1: 2, 40: 3})
    assert list(measured) == [1, 40]
    assert [len(times) for times in measured[1]] == [2, 2] and [len(times) for times in measured[40]] == [3, 3]
    assert all(seconds > 0 for pair in measured.values() for times in pair for seconds in times)


@pytest.mark.component
def test_the_noop_chains_run_their_steps_in_order():
    import dagster as dg

    from benchmarks.noop_graph import defs

    assets = list(defs.assets)
    with dg.instance_for_test() as instance:
        for length in (1, 21):
            result = dg.materialize(assets, selection=f"group:chain_{length}", instance=instance)
            assert result.success
            materialized = [event.asset_key.path[-1] for event in result.get_asset_materialization_events()]
            assert materialized == [f"noop_{length}_{index}" for index in range(length)]


@pytest.mark.component
def test_the_in_process_run_reports_every_step_that_the_scale_table_names(tmp_path):
    """inprocess_run.py's report (sections 1 and 3) on the 178 wines: every step of STAGES timed, and
    a warm second call; the scale section's cells from it have no "skipped"."""
    from benchmarks.inprocess_run import materialize_report

    workspace = bench.Workspace(tmp_path / "inprocess", {"model": {"n_estimators": 10}})
    report = materialize_report(str(workspace.params_file), str(workspace.home), twice=True)
    assert report["success"] is True
    assert report["materialize_seconds"] > 0 and report["warm_materialize_seconds"] > 0
    assert set(report["steps"]) == set(STEP_KEYS)
    for step, timing in report["steps"].items():
        assert timing["start"] <= timing["end"] and "failed" not in timing, step
    assert json.loads(json.dumps(report)) == report  # what the script prints, read back by last_json
    cells = bench.scale_cells(report, lambda start, end: 200 * 2**20)
    assert all(cell.endswith(", 200 MiB") for cell in cells.values()), cells
    assert (workspace.root / "artifacts" / "model.skops").is_file()


# -- 2. prediction ------------------------------------------------------------------------------
@pytest.mark.unit
def test_alternate_warms_both_then_times_them_in_turn():
    calls = []

    def slow() -> None:
        calls.append("slow")
        time.sleep(0.01)

    first, second = bench.alternate(slow, lambda: calls.append("fast"), 3)
    assert calls == ["slow", "fast"] * 4
    assert len(first) == len(second) == 3
    assert min(first) >= 0.01 and min(second) >= 0


@pytest.mark.unit
def test_the_prediction_table_and_its_targets():
    measured = {1: ([0.002, 0.002, 0.003], [0.001, 0.001, 0.001]), 1000: ([0.010] * 3, [0.008] * 3)}
    lines = bench.prediction_lines({1: 3, 1000: 3}, measured, [1.5, 1.7])
    text = text_of(lines)
    assert lines[0] == "## 2. Prediction" and "repeats: 1 rows x 3, 1,000 rows x 3." in text
    assert "| 1 | 2.00 ms | 1.00 ms | 2.00x | 500 | 1,000 |" in lines
    assert "| 1,000 | 10.00 ms | 8.00 ms | 1.25x | 100,000 | 125,000 |" in lines
    assert "Targets: at most 1.5x for 1 row (now 2.00x) and 1.2x for 100,000 rows (not run)." in lines
    assert "one prediction): median 1.60 s over 2 runs." in text
    measured[100_000] = ([0.5], [0.45])
    with_large = text_of(bench.prediction_lines({1: 3, 1000: 3, 100_000: 1}, measured, [1.5]))
    assert "| 100,000 | 0.50 s | 0.45 s | 1.11x | 200,000 | 222,222 |" in with_large
    assert "and 1.2x for 100,000 rows (now 1.11x)." in with_large


# -- 3. scale -------------------------------------------------------------------------------------
@pytest.mark.unit
def test_the_rss_sampler_samples_this_process_and_finds_the_peak_of_a_window():
    sampler = bench.RssSampler(os.getpid())
    started = time.time()
    sampler.start()
    time.sleep(0.2)
    sampler.done.set()
    sampler.join(5)
    assert not sampler.is_alive() and sampler.samples
    assert all(rss > 10 * 2**20 for _, rss in sampler.samples)  # a Python with pandas loaded
    assert sampler.peak(started - 1, time.time() + 1) == max(rss for _, rss in sampler.samples)
    assert sampler.peak(0, started - 1) == 0


@pytest.mark.unit
def test_a_scale_column_times_each_step_and_marks_those_that_did_not_end():
    report = {
        "success": False,
        "steps": {
            "raw_wine": {"start": 100.0, "end": 100.25},
            "scaler": {"start": 100.5},
            "wine_model": {"start": 101.0, "end": 103.0, "failed": 1.0},
        },
    }
    windows = []

    def peak(start: float, end: float) -> int:
        windows.append((start, end))
        return 300 * 2**20

    cells = bench.scale_cells(report, peak)
    assert list(cells) == STEP_KEYS
    assert cells["raw_wine"] == "0.25 s, 300 MiB" and cells["wine_model"] == "2.00 s, 300 MiB"
    assert cells["scaler"] == "skipped" and cells["model_deployment"] == "skipped"
    assert windows == [(100.0, 100.25), (101.0, 103.0)]


@pytest.mark.unit
def test_a_scale_note_gives_time_memory_and_model_size():
    assert bench.scale_note(1000, 4.5, 512 * 2**20, 3 * 2**19) == (
        "1,000 rows: whole process 4.50 s, peak memory 512 MiB, the model file 1.5 MiB."
    )
    assert bench.scale_note(1000, 4.5, 512 * 2**20, None) == "1,000 rows: whole process 4.50 s."


@pytest.mark.unit
def test_the_scale_table_has_a_column_per_finished_size_and_names_the_largest():
    columns = [(size, {step: f"{step}@{size}" for step in STEP_KEYS}) for size in (1000, 10_000)]
    lines = bench.scale_lines([1000, 10_000, 100_000], -1, columns, ["note one", "note two"])
    text = text_of(lines)
    assert lines[0] == "## 3. Scale" and "with `model.n_jobs: -1`" in text
    assert "| step | 1,000 rows | 10,000 rows |\n|---|---|---|\n| ingestion: read the CSV (`raw_wine`) |" in text
    assert "| training (`wine_model`) | wine_model@1000 | wine_model@10000 |" in lines
    assert [line.split("(`")[1].split("`)")[0] for line in lines if "(`" in line and line.startswith("| ")] == (
        STEP_KEYS
    )
    assert "- note one" in lines and "- note two" in lines
    assert (
        "Largest size run here within 10 minutes per run: **10,000 rows** (sizes tried: 1,000, 10,000, 100,000)."
        in lines
    )
    failed = bench.scale_lines([1000], 1, [], ["1,000 rows failed: boom"])
    assert "| step |" in failed and not any("(`raw_wine`)" in line for line in failed)
    assert "- 1,000 rows failed: boom" in failed and any("**none rows**" in line for line in failed)


# -- 4. scale-out (the servers are the benchmark's; the table and when it is left out here) --------
@pytest.mark.unit
def test_section_4_is_left_out_for_smoke_skip_or_missing_servers_which_come_first():
    assert bench.scaleout_skip_reason(False, False, []) is None
    assert bench.scaleout_skip_reason(True, False, []) == "`--smoke` or `--skip-scaleout`"
    assert bench.scaleout_skip_reason(False, True, []) == "`--smoke` or `--skip-scaleout`"
    assert bench.scaleout_skip_reason(True, False, ["redis-server"]) == "redis-server not installed"
    assert bench.scaleout_skip_reason(False, False, ["redis-server", "postgresql"]) == (
        "redis-server, postgresql not installed"
    )


@pytest.mark.unit
def test_the_executor_configs_are_the_projects():
    assert yaml.safe_load(bench.EXECUTOR_CONFIGS["multiprocess"]) == {"execution": {"config": {"multiprocess": {}}}}
    assert bench.EXECUTOR_CONFIGS["celery"] == (REPO_ROOT / "deploy" / "run-celery.yaml").read_text()
    assert "execution" in yaml.safe_load(bench.EXECUTOR_CONFIGS["celery"])
    assert bench.EXECUTOR_CONFIGS["in_process"] is None


@pytest.mark.unit
def test_the_scaleout_table_compares_with_in_process_sqlite_and_times_the_training():
    whole = {("sqlite", "in_process"): [2.0, 2.2], ("sqlite", "celery"): [6.0, 6.4], ("postgres", "in_process"): [3.0]}
    noop = {
        ("sqlite", "in_process", 1): [1.0],
        ("sqlite", "in_process", 21): [1.2],
        ("sqlite", "celery", 1): [2.0],
        ("sqlite", "celery", 21): [12.0],
        ("postgres", "in_process", 1): [1.5],
        ("postgres", "in_process", 21): [2.5],
    }
    ways = ["local, n_jobs 1", "local, n_jobs -1", "Dask cluster (2 workers x 1 thread)"]
    training = {100_000: dict(zip(ways, [[4.0], [2.0], [6.0]], strict=True)), 10**6: dict.fromkeys(ways, [40.0])}
    lines = bench.scaleout_lines(2, 2, 1, whole, noop, training)
    assert lines[0] == bench.SCALEOUT_HEADING
    assert "Runs per cell: 2 for the graph (1 for multiprocess), 2 for the chains." in text_of(lines)
    assert "| sqlite | in_process | 2.10 s (2.0, 2.2) | 1.00x | 10.00 ms | 1.00 s |" in lines
    assert "| sqlite | celery | 6.20 s (6.0, 6.4) | 2.95x | 0.50 s | 2.00 s |" in lines
    assert "| postgres | in_process | 3.00 s (3.0) | 1.43x | 50.00 ms | 1.50 s |" in lines
    assert "| rows | local, n_jobs 1 | local, n_jobs -1 | Dask cluster (2 workers x 1 thread) |" in lines
    assert "|---|---|---|---|" in lines
    assert "| 100,000 | 4.00 s | 2.00 s | 6.00 s |" in lines and "| 1,000,000 | 40.00 s | 40.00 s | 40.00 s |" in lines


# -- 5. serving (the servers and wrk are the benchmark's; wrk's output, the body and the table here) --
@pytest.mark.unit
def test_wrk_output_gives_latencies_in_seconds_throughput_and_requests():
    assert bench_serving.parse_wrk(WRK_ONE_CONNECTION) == {
        "p50": pytest.approx(693e-6),
        "p99": pytest.approx(1.29e-3),
        "rps": 1372.41,
        "errors": 0,
        "requests": 1373,
    }


@pytest.mark.unit
def test_wrk_output_counts_socket_errors_and_failed_responses_as_failed():
    assert bench_serving.parse_wrk(WRK_WITH_ERRORS) == {
        "p50": pytest.approx(59.8e-3),
        "p99": pytest.approx(1.02),
        "rps": 1036.71,
        "errors": 10,
        "requests": 10377,
    }
    assert bench_serving._seconds("250us") == pytest.approx(250e-6) and bench_serving._seconds("1.5m") == 90.0


@pytest.mark.unit
def test_the_wrk_command_uses_at_most_two_threads_and_a_30_second_timeout():
    script = Path("/bench/post.lua")
    assert bench_serving.wrk_command("http://127.0.0.1:8000/invocations", 1, 1, script) == [
        "wrk",
        "-t",
        "1",
        "-c",
        "1",
        "-d",
        "1s",
        "--timeout",
        "30s",
        "--latency",
        "-s",
        "/bench/post.lua",
        "http://127.0.0.1:8000/invocations",
    ]
    assert bench_serving.wrk_command("http://h/", 64, 10, script)[1:7] == ["-t", "2", "-c", "64", "-d", "10s"]


@pytest.mark.unit
def test_the_request_body_is_mlflows_dataframe_split_and_the_lua_script_sends_it_unchanged():
    assert json.loads(bench_serving.body(3)) == {
        "dataframe_split": {"columns": list(FEATURE_COLUMNS), "data": [bench_serving.ROW] * 3}
    }
    values = np.arange(26.0).reshape(2, 13)
    assert json.loads(bench_serving.body(values=values))["dataframe_split"]["data"] == values.tolist()
    script = bench_serving.wrk_script(bench_serving.body(1)).splitlines()
    assert script[0] == 'wrk.method = "POST"' and script[2] == 'wrk.headers["Content-Type"] = "application/json"'
    assert script[1].startswith("wrk.body = ")
    assert json.loads(script[1].removeprefix("wrk.body = ")) == bench_serving.body(1).decode()


@pytest.mark.unit
def test_the_registry_serves_v1_and_the_benchmark_row_is_a_wine_it_accepts(registry):
    assert ModelRegistry(registry).production_version() == 1
    assert all(
        BOUNDS[name][0] <= value <= BOUNDS[name][1]
        for name, value in zip(FEATURE_COLUMNS, bench_serving.ROW, strict=True)
    )
    result = predict(pd.DataFrame([bench_serving.ROW], columns=list(FEATURE_COLUMNS)), registry_dir=registry)
    assert result.version == 1 and len(result.predictions) == 1
    assert result.predictions["predicted_class"].iloc[0] in {0, 1, 2}


@pytest.mark.unit
def test_the_check_rows_are_the_wines_and_seeded_rows_within_the_bounds():
    (wines_name, wines), (random_name, random_rows) = bench_serving.check_rows(50)
    assert (wines_name, wines.shape) == ("the 178 wines", (178, 13))
    assert (random_name, random_rows.shape) == ("50 random in-bounds rows", (50, 13))
    lows = np.array([BOUNDS[name][0] for name in FEATURE_COLUMNS])
    highs = np.array([BOUNDS[name][1] for name in FEATURE_COLUMNS])
    assert ((random_rows >= lows) & (random_rows <= highs)).all()
    np.testing.assert_array_equal(random_rows, bench_serving.check_rows(50)[1][1])


@pytest.mark.unit
def test_served_predictions_equal_to_the_batch_paths_pass_and_any_difference_fails(registry):
    values = bench_serving.check_rows(20)[1][1]
    served = predict(pd.DataFrame(values, columns=list(FEATURE_COLUMNS)), registry_dir=registry).predictions
    records = served.to_dict("records")
    assert bench_serving.compare_with_batch("20 rows", values, records, registry) == (
        "- 20 rows: same classes, largest probability difference 0.0e+00"
    )
    probability = next(column for column in served if column.startswith("probability_"))
    nudged = [dict(record) for record in records]
    nudged[3][probability] += 1e-6
    with pytest.raises(RuntimeError, match="differs from the batch path on 20 rows: classes True"):
        bench_serving.compare_with_batch("20 rows", values, nudged, registry)
    flipped = [dict(record) for record in records]
    flipped[0]["predicted_class"] = (flipped[0]["predicted_class"] + 1) % 3
    with pytest.raises(RuntimeError, match="classes False"):
        bench_serving.compare_with_batch("20 rows", values, flipped, registry)


@pytest.mark.unit
def test_post_and_get_status_answer_0_while_nothing_listens():
    url = f"http://127.0.0.1:{bench_serving.free_port()}"
    assert bench_serving.post(url + "/invocations", bench_serving.body(1), timeout=5) == (0, b"")
    assert bench_serving.get_status(url + "/ping") == 0


@pytest.mark.unit
def test_serving_is_not_run_without_wrk(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "no-programs"))
    assert bench_serving.serving(tmp_path, smoke=True) == [
        bench_serving.HEADING,
        "",
        "Not run (wrk is not installed: apt-get install wrk).",
        "",
    ]
    assert not (tmp_path / "serving").exists()


def wrk_run(p50: float, p99: float, rps: float, errors: int = 0, requests: int = 1000) -> dict[str, float]:
    return {"p50": p50, "p99": p99, "rps": rps, "errors": errors, "requests": requests}


@pytest.mark.unit
def test_the_serving_table_of_a_smoke_run():
    plain = "plain FastAPI + predict()"
    results = {
        ("ours", 1): [bench_serving.parse_wrk(WRK_ONE_CONNECTION)],
        (plain, 1): [wrk_run(0.002, 0.004, 686.0, requests=686)],
    }
    identical = "- the 178 wines: same classes, largest probability difference 0.0e+00"
    lines = bench_serving.serving_lines(1, 1, "not run (`--smoke`)", identical, [1], ["ours", plain], results)
    text = text_of(lines)
    assert "(1 s per run, 1 run(s) per cell taken alternately; medians). MLflow: not run (`--smoke`)." in text
    assert identical in lines
    assert "| ours | 1 | 0.69 ms | 1.29 ms | 1,372 | 0 of 1,373 |" in lines
    assert "| plain FastAPI + predict() | 1 | 2.00 ms | 4.00 ms | 686 | 0 of 686 |" in lines
    assert "Throughput of ours / plain FastAPI + predict(): 2.0x at 1 connection(s)." in lines
    assert "Targets, ours: median 0.69 ms (target <= 2 ms); p99 1.29 ms (target <= 10 ms) at 1 connection." in lines


@pytest.mark.unit
def test_the_serving_table_takes_medians_over_repeats_and_sums_the_failures():
    plain = "plain FastAPI + predict()"
    results = {
        ("ours", 1): [wrk_run(0.001, 0.003, 900.0), wrk_run(0.0012, 0.005, 1000.0), wrk_run(0.0011, 0.004, 950.0)],
        ("ours", 16): [wrk_run(0.01, 0.02, rps, errors, 10_000) for rps, errors in ((900, 0), (1000, 1), (1100, 2))],
        (plain, 1): [wrk_run(0.002, 0.006, 475.0)] * 3,
        (plain, 16): [wrk_run(0.03, 0.05, 250.0)] * 3,
    }
    lines = bench_serving.serving_lines(10, 3, "MLflow 3", "- checked", [1, 16], ["ours", plain], results)
    assert "| ours | 1 | 1.10 ms | 4.00 ms | 950 | 0 of 3,000 |" in lines
    assert "| ours | 16 | 10.00 ms | 20.00 ms | 1,000 | 3 of 30,000 |" in lines
    assert lines.index("| ours | 1 | 1.10 ms | 4.00 ms | 950 | 0 of 3,000 |") < lines.index(
        "| plain FastAPI + predict() | 1 | 2.00 ms | 6.00 ms | 475 | 0 of 3,000 |"
    )
    assert "Throughput of ours / plain FastAPI + predict(): 2.0x at 1, 4.0x at 16 connection(s)." in lines
    assert lines[-2] == (
        "Targets, ours: median 1.10 ms (target <= 2 ms); p99 4.00 ms (target <= 10 ms) at 1 connection; "
        "1,000 requests/s with 3 failed at 16 connections (target >= 500, 0 failed)."
    )


@pytest.mark.component
def test_the_plain_fastapi_baseline_answers_with_the_batch_paths_predictions(registry, tmp_path, monkeypatch):
    from fastapi.testclient import TestClient

    from benchmarks.plain_fastapi import app

    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"paths": {"registry_dir": str(registry)}}))
    monkeypatch.setenv("WINE_ASSETS_PARAMS", str(params))
    values = bench_serving.check_rows(3)[1][1]
    expected = predict(pd.DataFrame(values, columns=list(FEATURE_COLUMNS)), registry_dir=registry).predictions
    with TestClient(app) as client:
        answered = client.post(
            "/invocations", content=bench_serving.body(values=values), headers={"Content-Type": "application/json"}
        )
        assert answered.status_code == 200, answered.text
        document = answered.json()
        assert document["model_version"] == 1
        assert [row["predicted_class"] for row in document["predictions"]] == expected["predicted_class"].tolist()
        short = {"dataframe_split": {"columns": list(FEATURE_COLUMNS[:12]), "data": [bench_serving.ROW[:12]]}}
        refused = client.post("/invocations", json=short)
        assert refused.status_code == 400 and FEATURE_COLUMNS[12] in refused.json()["message"]


# -- 6. experiments -------------------------------------------------------------------------------
@pytest.mark.unit
def test_the_experiment_workspace_of_a_smoke_run_and_of_a_measurement(tmp_path):
    params_file, env = bench_experiments._workspace(tmp_path / "smoke", smoke=True)
    assert env["WINE_ASSETS_PARAMS"] == str(params_file) and env["PYTHONWARNINGS"] == "ignore"
    smoke = load_params(params_file)
    assert dict(smoke.experiments.datasets) == {"wine": "builtin"}
    assert list(variants_of(smoke))[1:] == ["logistic_regression"]
    assert (smoke.experiments.folds, smoke.experiments.repeats) == (5, 1)
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "smoke" / "linear.csv"), linear_frame())

    params_file, _ = bench_experiments._workspace(tmp_path / "full", smoke=False)
    full = load_params(params_file)
    assert full.dataset_source_path("linear") == tmp_path / "full" / "linear.csv"
    assert list(variants_of(full))[1:] == ["extra_trees", "gradient_boosting", "logistic_regression"]
    assert full.experiments.repeats == 2


@pytest.mark.unit
def test_the_work_scores_every_partition_of_the_smoke_grid(tmp_path):
    params_file, _ = bench_experiments._workspace(tmp_path / "experiments", smoke=True)
    seconds, partitions = bench_experiments._work(params_file)
    assert partitions == 2 and seconds > 0  # one dataset x (production, logistic regression)


@pytest.mark.unit
def test_the_experiments_table_and_dagsters_cost_per_run():
    stdout = "== wine: decision: keep production\n  1. production 0.97\n"
    lines = bench_experiments.experiments_lines(True, 2, [1.0], [10.0], [8.0], stdout)
    text = text_of(lines)
    assert lines[0] == bench_experiments.HEADING
    assert "1 dataset(s) x 2 variants, 5-fold x 1 repeats; 1 alternating run(s) of each, medians." in text
    assert "Each grid is 4 Dagster runs on a fresh SQLite DAGSTER_HOME." in text
    assert "| work: score_variant on every partition, one process, no Dagster | 1.0 s | 1.0 |" in lines
    assert "| `wine-assets experiment run --workers 1` | 10.0 s | 10.0 |" in lines
    assert "| `wine-assets experiment run --workers 2` | 8.0 s | 8.0 |" in lines
    assert (
        f"Parallel / sequential: 0.80 (speed-up 1.25x on {os.cpu_count()} cores). Dagster's cost per run, "
        "command start included: (sequential - work) / 4 = 2.25 s." in lines
    )
    assert lines[-5:] == ["```", "== wine: decision: keep production", "  1. production 0.97", "```", ""]
    full = text_of(bench_experiments.experiments_lines(False, 8, [3.0, 2.0, 4.0], [30.0, 32.0, 31.0], [20.0] * 3, ""))
    assert "2 dataset(s) x 4 variants, 5-fold x 2 repeats; 3 alternating run(s) of each" in full
    assert "(sequential - work) / 12 = 2.33 s." in full


# -- the synthetic data (sections 1-3 and 6) --------------------------------------------------------
@pytest.mark.unit
def test_the_synthetic_data_passes_the_schema_and_keeps_the_classes():
    frame = synthetic_frame(5000, seed=3)
    assert len(frame) == 5000
    validate_frame(frame, WineSchema)
    assert set(frame["target"]) == {0, 1, 2}
    pd.testing.assert_frame_equal(frame, synthetic_frame(5000, seed=3))
    assert not frame.equals(synthetic_frame(5000, seed=4))


@pytest.mark.unit
def test_the_synthetic_csv_is_the_synthetic_frame(tmp_path):
    path = write_csv(300, tmp_path / "wine.csv", seed=9)
    assert path == tmp_path / "wine.csv"
    pd.testing.assert_frame_equal(pd.read_csv(path), synthetic_frame(300, seed=9))


@pytest.mark.unit
def test_the_linear_data_is_valid_seeded_and_has_three_classes():
    frame = linear_frame()
    assert len(frame) == 240 and list(frame.columns) == [*FEATURE_COLUMNS, "target"]
    validate_frame(frame, WineSchema)
    assert set(frame["target"]) == {0, 1, 2}
    pd.testing.assert_frame_equal(frame, linear_frame())
    assert not frame.equals(linear_frame(seed=8))
