"""Section 6 of the benchmarks: the experiment grid, sequential and in parallel, and Dagster's cost.

The grid: 2 datasets (the built-in wine data and a 240-row synthetic set whose classes are linear
in the features) x 4 variants (production's Random Forest, extra trees, gradient boosting,
logistic regression) x 5-fold x 2-repeat cross-validation, plus the holdout fit of each.

* work: ``wine_assets.experiments.score_variant`` called directly for the 8 partitions, in one
  process, no Dagster: what the grid computes;
* sequential: ``wine-assets experiment run --workers 1`` on a fresh DAGSTER_HOME (12 Dagster runs:
  2 datasets, 8 variant partitions, 2 decisions), the command's start included;
* parallel: the same with ``--workers 2`` (the variant partitions in two processes).

Taken alternately; the table shows medians. Dagster's cost per run is (sequential - work) / 12.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

from benchmarks.synthetic import linear_frame

BIN = Path(sys.executable).parent
HEADING = "## 6. Experiments: the grid, sequential and in parallel"

VARIANTS = {
    "extra_trees": {"family": "extra_trees", "n_estimators": 200, "random_state": 42},
    "gradient_boosting": {"family": "gradient_boosting", "n_estimators": 100, "random_state": 42},
    "logistic_regression": {"family": "logistic_regression", "C": 1.0, "max_iter": 1000},
}


def _workspace(root: Path, smoke: bool) -> tuple[Path, dict[str, str]]:
    root.mkdir(parents=True, exist_ok=True)
    linear_frame().to_csv(root / "linear.csv", index=False)
    variants = {"logistic_regression": VARIANTS["logistic_regression"]} if smoke else VARIANTS
    document = {
        "paths": {"artifacts_dir": "artifacts", "registry_dir": "registry"},
        "experiments": {
            "datasets": {"wine": "builtin"} if smoke else {"wine": "builtin", "linear": "linear.csv"},
            "variants": variants,
            "folds": 5,
            "repeats": 1 if smoke else 2,
            "seed": 42,
        },
    }
    params_file = root / "params.yaml"
    params_file.write_text(yaml.safe_dump(document))
    env = dict(os.environ, WINE_ASSETS_PARAMS=str(params_file), PYTHONWARNINGS="ignore")
    return params_file, env


def _grid(root: Path, env: dict[str, str], workers: int, index: int) -> tuple[float, str]:
    home = root / f"home-{workers}-{index}"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    started = time.perf_counter()
    completed = subprocess.run(
        [str(BIN / "wine-assets"), "experiment", "run", "--workers", str(workers)],
        cwd=root,
        env={**env, "DAGSTER_HOME": str(home)},
        capture_output=True,
        text=True,
        timeout=1800,
    )
    elapsed = time.perf_counter() - started
    if completed.returncode != 0:
        raise RuntimeError(f"experiment run --workers {workers} failed:\n{completed.stderr[-3000:]}")
    return elapsed, completed.stdout


def _work(params_file: Path) -> tuple[float, int]:
    from wine_assets.experiments import score_variant, variants_of
    from wine_assets.ingestion import load_raw
    from wine_assets.params import load_params
    from wine_assets.validation import WineSchema, validate_frame

    params = load_params(params_file)
    started = time.perf_counter()
    partitions = 0
    for dataset in params.experiments.datasets:
        frame = validate_frame(load_raw(params, dataset).frame, WineSchema)
        for variant in variants_of(params).values():
            score_variant(frame, dataset, variant, params)
            partitions += 1
    return time.perf_counter() - started, partitions


def experiments(tmp: Path, smoke: bool = False) -> list[str]:
    root = tmp / "experiments"
    params_file, env = _workspace(root, smoke)
    repeat = 1 if smoke else 3
    work, sequential, parallel = [], [], []
    stdout = ""
    for index in range(repeat):
        seconds, partitions = _work(params_file)
        work.append(seconds)
        sequential.append(_grid(root, env, 1, index)[0])
        seconds, stdout = _grid(root, env, 2, index)
        parallel.append(seconds)
    return experiments_lines(smoke, partitions, work, sequential, parallel, stdout)


def experiments_lines(
    smoke: bool, partitions: int, work: list[float], sequential: list[float], parallel: list[float], stdout: str
) -> list[str]:
    """Section 6 from its alternating runs (seconds) and the last parallel grid's standard output."""
    datasets = 1 if smoke else 2
    repeat = len(work)
    runs = datasets * 2 + partitions
    w, s, p = (statistics.median(values) for values in (work, sequential, parallel))
    lines = [
        HEADING,
        "",
        f"{datasets} dataset(s) x {partitions // datasets} variants, 5-fold x {1 if smoke else 2} repeats; "
        f"{repeat} alternating run(s) of each, medians. Each grid is {runs} Dagster runs on a fresh SQLite "
        "DAGSTER_HOME.",
        "",
        "| what | median | runs |",
        "|---|---|---|",
        f"| work: score_variant on every partition, one process, no Dagster | {w:.1f} s | "
        + ", ".join(f"{value:.1f}" for value in work)
        + " |",
        f"| `wine-assets experiment run --workers 1` | {s:.1f} s | " + ", ".join(f"{v:.1f}" for v in sequential) + " |",
        f"| `wine-assets experiment run --workers 2` | {p:.1f} s | " + ", ".join(f"{v:.1f}" for v in parallel) + " |",
        "",
        f"Parallel / sequential: {p / s:.2f} (speed-up {s / p:.2f}x on {os.cpu_count()} cores). "
        f"Dagster's cost per run, command start included: (sequential - work) / {runs} = {(s - w) / runs:.2f} s.",
        "",
        "The leaderboards and decisions of the last parallel run:",
        "",
        "```",
        *stdout.rstrip().splitlines(),
        "```",
        "",
    ]
    return lines
