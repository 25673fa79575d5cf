"""Benchmarks of wine_assets: pipeline overhead, prediction speed, how cost grows with data, serving,
experiments.

    make bench                                   # python benchmarks/run.py --output benchmarks/RESULTS.md
    python benchmarks/run.py --smoke --output /tmp/RESULTS.md   # 10^3 rows, one run each (CI)
    python -m benchmarks.run --smoke --output /tmp/RESULTS.md   # the same, from the repository's root

Everything runs on this machine in temporary folders; the report says what the machine is.
Timings are wall-clock medians over runs taken alternately in one session, so slow drift of
the machine falls on both sides of every ratio.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
if not __package__:
    # `python benchmarks/run.py`: the benchmarks are a package of the repository, as under `python -m benchmarks.run`
    sys.path.insert(0, str(HERE.parent))

from benchmarks.experiments import HEADING as EXPERIMENTS_HEADING  # noqa: E402
from benchmarks.experiments import experiments  # noqa: E402
from benchmarks.serving import HEADING as SERVING_HEADING  # noqa: E402
from benchmarks.serving import serving  # noqa: E402
from benchmarks.synthetic import synthetic_frame, write_csv  # noqa: E402

STEP_TIMEOUT = 600  # seconds: the scale runs stop at the first size that needs longer


# -- the machine -------------------------------------------------------------------------------
def machine_lines() -> list[str]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = "unknown"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                memory = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    except OSError:
        pass
    versions = ", ".join(
        f"{name} {importlib.metadata.version(name)}"
        for name in ("dagster", "scikit-learn", "pandas", "numpy", "pandera", "matplotlib")
    )
    return [
        f"- CPU: {cpu}, {os.cpu_count()} logical cores",
        f"- memory: {memory}",
        f"- system: {platform.platform()}",
        f"- Python {platform.python_version()}; {versions}",
    ]


# -- workspaces --------------------------------------------------------------------------------
@dataclass
class Workspace:
    """A folder with its own params file, artifacts, registry and Dagster instance."""

    root: Path
    params: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.home = self.root / "dagster_home"
        self.home.mkdir(parents=True, exist_ok=True)
        (self.home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
        document = {"paths": {"artifacts_dir": "artifacts", "registry_dir": "registry"}}
        for section, values in self.params.items():
            document.setdefault(section, {}).update(values)
        self.params_file = self.root / "params.yaml"
        self.params_file.write_text(yaml.safe_dump(document))

    @property
    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(DAGSTER_HOME=str(self.home), WINE_ASSETS_PARAMS=str(self.params_file), PYTHONWARNINGS="ignore")
        return env


def run(command: Sequence[str], workspace: Workspace, extra_env: dict[str, str] | None = None, timeout: float = 900):
    env = workspace.env
    env.update(extra_env or {})
    started = time.perf_counter()
    completed = subprocess.run(
        list(command), cwd=workspace.root, env=env, capture_output=True, text=True, timeout=timeout
    )
    elapsed = time.perf_counter() - started
    if completed.returncode != 0:
        raise RuntimeError(f"{shlex.join(command)} failed in {workspace.root}:\n{completed.stderr[-3000:]}")
    return elapsed, completed


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def fmt(seconds: float) -> str:
    return f"{seconds:.2f} s" if seconds >= 0.1 else f"{seconds * 1000:.2f} ms"


# -- 0. set-up ---------------------------------------------------------------------------------
def timed_shell(command: Sequence[str], cwd: Path, env: dict[str, str], timeout: float = 1800) -> float:
    started = time.perf_counter()
    completed = subprocess.run(list(command), cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if completed.returncode != 0:
        raise RuntimeError(f"{shlex.join(command)} failed:\n{completed.stdout[-1500:]}\n{completed.stderr[-1500:]}")
    return time.perf_counter() - started


def setup(tmp: Path, runs: int, pip_runs: int) -> list[str]:
    """A fresh clone's first `make run` (uv bootstrapped, the lock installed, every asset), with
    empty package caches; and the same package set installed by pip, for comparison."""
    repo = HERE.parent
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True, text=True)
    clean_env = setup_env(os.environ)
    first_run, cold_install, warm_install, pip_install = [], [], [], []
    for index in range(runs):
        clone = tmp / f"clone-{index}"
        subprocess.run(["git", "clone", "--quiet", str(repo), str(clone)], check=True, timeout=300)
        env = {**clean_env, "UV_CACHE_DIR": str(tmp / f"uv-cache-{index}"), "PIP_CACHE_DIR": str(tmp / f"pip-{index}")}
        first_run.append(timed_shell(["make", "run"], clone, env))
        # The install alone, into a new venv: from the now warm cache, then from an empty one.
        shutil.rmtree(clone / ".venv")
        warm_install.append(timed_shell(["make", "install"], clone, env))
        shutil.rmtree(clone / ".venv")
        env["UV_CACHE_DIR"] = str(tmp / f"uv-cache-{index}-again")
        cold_install.append(timed_shell(["make", "install"], clone, env))
    clone = tmp / "clone-0"
    requirements = tmp / "requirements.txt"
    exported = subprocess.run(
        [
            str(clone / ".tools/uv/bin/uv"),
            "export",
            "--frozen",
            "--extra",
            "dev",
            "--no-emit-project",
            "--output-file",
            str(requirements),
        ],
        cwd=clone,
        capture_output=True,
        text=True,
        env=clean_env,
        timeout=300,
    )
    if exported.returncode != 0:
        raise RuntimeError(exported.stderr)
    for index in range(pip_runs):
        venv = tmp / f"pip-venv-{index}"
        env = {**clean_env, "PIP_CACHE_DIR": str(tmp / f"pip-cache-{index}")}
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
        timed_shell(
            # --no-deps: the exported list is the whole locked set, installed as listed (as uv does);
            # pip's resolver would also refuse an extra such as gql[requests] under --require-hashes.
            [
                str(venv / "bin/python"),
                "-m",
                "pip",
                "install",
                "--quiet",
                "--no-deps",
                "--require-hashes",
                "-r",
                str(requirements),
            ],
            clone,
            env,
        )
        timed_shell([str(venv / "bin/python"), "-m", "pip", "install", "--quiet", "--no-deps", "-e", "."], clone, env)
        pip_install.append(time.perf_counter() - started)
    return setup_lines(head.stdout.strip(), runs, first_run, cold_install, warm_install, pip_install)


def setup_env(environ: Mapping[str, str]) -> dict[str, str]:
    """A new user's environment: no venv, uv or pip settings of this session, no Dagster home or params file."""
    clean_env = {key: value for key, value in environ.items() if not key.startswith(("VIRTUAL_ENV", "UV", "PIP"))}
    clean_env.pop("DAGSTER_HOME", None)
    clean_env.pop("WINE_ASSETS_PARAMS", None)
    clean_env["PYTHONWARNINGS"] = "ignore"
    return clean_env


def times_cell(values: Sequence[float]) -> str:
    """Two table cells: the median, and every run in seconds."""
    return f"{fmt(median(values))} | {', '.join(f'{v:.1f}' for v in values)}"


def setup_lines(
    head: str,
    runs: int,
    first_run: Sequence[float],
    cold_install: Sequence[float],
    warm_install: Sequence[float],
    pip_install: Sequence[float],
) -> list[str]:
    return [
        "## 0. Set-up",
        "",
        f"A fresh `git clone` of this commit ({head}), then `make run` as a new user types it: "
        "uv bootstrapped from PyPI into `.tools/uv`, `uv sync --locked` of `uv.lock` into `.venv`, then "
        "`dagster asset materialize --select '*'` and the summary. Package caches empty at the start "
        f"(`UV_CACHE_DIR`, `PIP_CACHE_DIR` in fresh folders); {runs} clone(s).",
        "",
        "| what | median | runs (s) |",
        "|---|---|---|",
        f"| first `make run` of a fresh clone, install included | {times_cell(first_run)} |",
        f"| `make install` into a new `.venv`, uv cache empty | {times_cell(cold_install)} |",
        f"| `make install` into a new `.venv`, uv cache warm | {times_cell(warm_install)} |",
        f"| pip: the same locked set (`uv export`, `pip install --no-deps --require-hashes`) and the project, "
        f"new venv, pip cache empty | {times_cell(pip_install) if pip_install else 'not run | '} |",
        "",
        f"Target: the first `make run` under 60 s (now {fmt(median(first_run))}).",
        "",
    ]


# -- 1. overhead -------------------------------------------------------------------------------
CLI = [str(BIN / "dagster"), "asset", "materialize", "-m", "wine_assets", "--select", "*"]
BARE = [sys.executable, str(HERE / "bare_pipeline.py")]
INPROCESS = [sys.executable, str(HERE / "inprocess_run.py")]


def overhead_at_size(tmp: Path, rows: int, runs: int) -> list[str]:
    """The same CLI-against-bare comparison on a larger CSV, where the work outweighs Dagster's fixed cost."""
    source = write_csv(rows, tmp / f"overhead-{rows}.csv", seed=rows)
    times: dict[str, list[float]] = {"bare": [], "cli": []}
    for index in range(runs):
        for kind in ("bare", "cli") if index % 2 == 0 else ("cli", "bare"):
            workspace = Workspace(tmp / f"overhead-{rows}-{kind}-{index}", {"data": {"source": str(source)}})
            command = [*BARE, str(workspace.params_file)] if kind == "bare" else CLI
            times[kind].append(run(command, workspace)[0])
    return overhead_at_size_lines(rows, runs, median(times["bare"]), median(times["cli"]))


def overhead_at_size_lines(rows: int, runs: int, bare: float, cli: float) -> list[str]:
    return [
        f"The same comparison on {rows:,} synthetic rows (see Scale), {runs} runs each, default params: "
        f"bare {fmt(bare)}, CLI {fmt(cli)}, **ratio {cli / bare:.2f}x**.",
        "",
    ]


def work_seconds(stderr: str) -> float:
    """The work's seconds that bare_pipeline.py writes to standard error under WINE_BENCH_TIMING=1."""
    return float(stderr.split("work_seconds")[1].split()[0])


def last_json(stdout: str) -> dict:
    """The report inprocess_run.py prints as the last line of its standard output."""
    return json.loads(stdout.strip().splitlines()[-1])


def overhead(tmp: Path, runs: int, multiprocess_runs: int, noop_runs: int) -> tuple[list[str], Workspace]:
    times: dict[str, list[float]] = {"bare": [], "cli": [], "inprocess": []}
    work, materialize_call, warm_call = [], [], []
    last: Workspace | None = None
    for index in range(runs):
        order = ["bare", "cli", "inprocess"] if index % 2 == 0 else ["inprocess", "cli", "bare"]
        for kind in order:
            workspace = Workspace(tmp / f"overhead-{kind}-{index}")
            if kind == "bare":
                elapsed, completed = run([*BARE, str(workspace.params_file)], workspace, {"WINE_BENCH_TIMING": "1"})
                work.append(work_seconds(completed.stderr))
            elif kind == "cli":
                elapsed, _ = run(CLI, workspace)
                last = workspace
            else:
                elapsed, completed = run([*INPROCESS, str(workspace.params_file), str(workspace.home)], workspace)
                materialize_call.append(last_json(completed.stdout)["materialize_seconds"])
            times[kind].append(elapsed)

    for index in range(runs):
        workspace = Workspace(tmp / f"overhead-warm-{index}")
        _, completed = run([*INPROCESS, str(workspace.params_file), str(workspace.home), "--twice"], workspace)
        warm_call.append(last_json(completed.stdout)["warm_materialize_seconds"])

    multiprocess = []
    config = tmp / "multiprocess.yaml"
    config.write_text("execution:\n  config:\n    multiprocess: {}\n")
    for index in range(multiprocess_runs):
        workspace = Workspace(tmp / f"overhead-multiprocess-{index}")
        multiprocess.append(run([*CLI, "-c", str(config)], workspace)[0])

    noop: dict[int, list[float]] = {1: [], 21: []}
    for index in range(noop_runs):
        for steps in (1, 21):
            workspace = Workspace(tmp / f"noop-{steps}-{index}")
            command = [str(BIN / "dagster"), "asset", "materialize", "-f", str(HERE / "noop_graph.py")]
            noop[steps].append(run([*command, "--select", f"group:chain_{steps}"], workspace)[0])

    assert last is not None
    return overhead_lines(runs, times, multiprocess, work, materialize_call, warm_call, noop), last


def overhead_lines(
    runs: int,
    times: dict[str, list[float]],
    multiprocess: Sequence[float],
    work: Sequence[float],
    materialize_call: Sequence[float],
    warm_call: Sequence[float],
    noop: dict[int, list[float]],
) -> list[str]:
    """Section 1 from its measurements: whole processes (times: bare, cli, inprocess), in-process calls
    and the no-op chains of 1 and 21 steps."""
    bare, cli = median(times["bare"]), median(times["cli"])
    per_step = (median(noop[21]) - median(noop[1])) / 20
    return [
        "## 1. Pipeline overhead",
        "",
        "The whole graph (11 steps: 10 assets, of which train_set and test_set share a step, and the "
        "checks of two assets) against a bare script doing "
        "the same work by calling the same stage functions without Dagster (`benchmarks/bare_pipeline.py`: "
        "load, the data checks, validate, split, scale, train, evaluate, both plots, write the files, the "
        "model checks, release to the registry). Every run starts a fresh process in a fresh folder; "
        f"{runs} runs of each, alternating.",
        "",
        "| run | median | runs (s) |",
        "|---|---|---|",
        f"| bare script, whole process | {fmt(bare)} | {', '.join(f'{t:.2f}' for t in times['bare'])} |",
        f"| `{shlex.join(['dagster', *CLI[1:]])}` | {fmt(cli)} | {', '.join(f'{t:.2f}' for t in times['cli'])} |",
        f"| in-process `dagster.materialize()`, whole process | {fmt(median(times['inprocess']))} | "
        f"{', '.join(f'{t:.2f}' for t in times['inprocess'])} |",
        f"| multiprocess executor (CLI with `-c`) | {fmt(median(multiprocess)) if multiprocess else 'not run'} | "
        f"{', '.join(f'{t:.2f}' for t in multiprocess)} |",
        "",
        f"**Ratio CLI / bare: {cli / bare:.2f}x** (target: at most 1.5x). In-process process / bare: "
        f"{median(times['inprocess']) / bare:.2f}x. Multiprocess / bare: "
        + (f"{median(multiprocess) / bare:.2f}x." if multiprocess else "not run."),
        "",
        "Inside a process, after the imports: the bare script's work takes "
        f"{fmt(median(work))}; the first `materialize()` call for the same graph takes "
        f"{fmt(median(materialize_call))} ({median(materialize_call) / median(work):.2f}x; it also pays Dagster's "
        "first-run costs: its lazily imported modules, the instance's databases), and a second call in the "
        f"same process (as in a long-running `dagster dev` code server) takes {fmt(median(warm_call))} "
        f"({median(warm_call) / median(work):.2f}x).",
        "",
        f"Dagster's own cost, from chains of assets that do nothing, through the same CLI: 1 step "
        f"{fmt(median(noop[1]))}, 21 steps {fmt(median(noop[21]))}, so **{fmt(per_step)} per step** and "
        f"about {fmt(median(noop[1]))} for starting the CLI, loading a definitions module, running and exiting.",
        "",
    ]


# -- 2. prediction -----------------------------------------------------------------------------
def prediction(released: Workspace, tmp: Path, cold_runs: int, reps: dict[int, int]) -> list[str]:
    from wine_assets.validation import FEATURE_COLUMNS

    registry = released.root / "registry"
    measured = measure_prediction(registry, reps)
    one = tmp / "one-row.csv"
    synthetic_frame(1, seed=1).loc[:, list(FEATURE_COLUMNS)].to_csv(one, index=False)
    cold = [
        run([str(BIN / "wine-assets"), "predict", str(one), "--registry", str(registry)], released)[0]
        for _ in range(cold_runs)
    ]
    return prediction_lines(reps, measured, cold)


def measure_prediction(registry: Path, reps: dict[int, int]) -> dict[int, tuple[list[float], list[float]]]:
    """Per size: the times of `predict()` and of the raw scikit-learn calls on the same frame, alternately."""
    from wine_assets.predict import load_bundle, predict
    from wine_assets.validation import FEATURE_COLUMNS

    bundle = load_bundle(registry_dir=registry)
    measured = {}
    for size, repeat in reps.items():
        frame = synthetic_frame(size, seed=size).loc[:, list(FEATURE_COLUMNS)]

        def api(frame=frame) -> None:
            predict(frame, registry_dir=registry)

        def raw(frame=frame) -> None:
            bundle.model.predict_proba(bundle.scaler.transform(frame))

        measured[size] = alternate(api, raw, repeat)
    return measured


def prediction_lines(
    reps: dict[int, int], measured: dict[int, tuple[list[float], list[float]]], cold: Sequence[float]
) -> list[str]:
    """Section 2 from measure_prediction's times and the cold `wine-assets predict` runs."""
    rows = [
        "| rows | wine_assets.predict | raw scikit-learn | ratio | rows/s (predict) | rows/s (raw) |",
        "|---|---|---|---|---|---|",
    ]
    ratios = {}
    for size, (api_times, raw_times) in measured.items():
        ratio = median(api_times) / median(raw_times)
        ratios[size] = ratio
        rows.append(
            f"| {size:,} | {fmt(median(api_times))} | {fmt(median(raw_times))} | {ratio:.2f}x | "
            f"{size / median(api_times):,.0f} | {size / median(raw_times):,.0f} |"
        )
    cold_runs = len(cold)
    return [
        "## 2. Prediction",
        "",
        "In one process, with the bundle already loaded (its checksums verified once): "
        "`wine_assets.predict.predict(frame)` (input validation against the schema's features, "
        "scaling, `predict_proba`, the labelled output frame) against calling the same scikit-learn "
        "objects directly (`model.predict_proba(scaler.transform(frame))`). Calls alternate; "
        f"repeats: {', '.join(f'{n:,} rows x {r}' for n, r in reps.items())}.",
        "",
        *rows,
        "",
        f"Targets: at most 1.5x for 1 row (now {ratios[min(reps)]:.2f}x) and 1.2x for 100,000 rows"
        + (f" (now {ratios[100_000]:.2f}x)." if 100_000 in ratios else " (not run)."),
        "",
        f"Cold `wine-assets predict one-row.csv` (a new process: imports, checksums, unpickling, one "
        f"prediction): median {fmt(median(cold))} over {cold_runs} runs.",
        "",
    ]


def alternate(first: Callable[[], None], second: Callable[[], None], repeat: int) -> tuple[list[float], list[float]]:
    first()
    second()  # warm both before timing
    a, b = [], []
    for _ in range(repeat):
        for target, times in ((first, a), (second, b)):
            started = time.perf_counter()
            target()
            times.append(time.perf_counter() - started)
    return a, b


# -- 3. scale ----------------------------------------------------------------------------------
STAGES = [
    ("raw_wine", "ingestion: read the CSV"),
    ("raw_wine_checks", "data checks (pandera, sample size, outliers, drift)"),
    ("validated_wine", "validation: pandera schema"),
    ("validated_wine_labels_agree_with_production", "labels against production"),
    ("train_test_split_assets", "split"),
    ("scaler", "scaler"),
    ("wine_model", "training"),
    ("evaluation_metrics", "evaluation"),
    ("evaluation_checks", "model checks (gate, challenge to production)"),
    ("confusion_matrix_plot", "confusion matrix plot"),
    ("feature_importance_plot", "feature importance plot"),
    ("model_deployment", "release"),
]


class RssSampler(threading.Thread):
    """Samples a process's resident memory every 50 ms (Linux /proc)."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid = pid
        self.samples: list[tuple[float, int]] = []
        self.done = threading.Event()

    def run(self) -> None:
        status = Path(f"/proc/{self.pid}/status")
        while not self.done.is_set():
            try:
                for line in status.read_text().splitlines():
                    if line.startswith("VmRSS"):
                        self.samples.append((time.time(), int(line.split()[1]) * 1024))
            except OSError:
                return
            self.done.wait(0.05)

    def peak(self, start: float, end: float) -> int:
        inside = [rss for moment, rss in self.samples if start <= moment <= end]
        return max(inside, default=0)


def scale(tmp: Path, sizes: Sequence[int], n_jobs: int) -> list[str]:
    columns: list[tuple[int, dict[str, str]]] = []
    notes: list[str] = []
    for size in sizes:
        workspace = Workspace(tmp / f"scale-{size}", {"data": {"source": "wine.csv"}, "model": {"n_jobs": n_jobs}})
        write_csv(size, workspace.root / "wine.csv", seed=size)
        env = workspace.env
        started = time.perf_counter()
        process = subprocess.Popen(
            [*INPROCESS, str(workspace.params_file), str(workspace.home)],
            cwd=workspace.root,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        sampler = RssSampler(process.pid)
        sampler.start()
        try:
            stdout, stderr = process.communicate(timeout=STEP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()
            notes.append(
                f"{size:,} rows did not finish within {STEP_TIMEOUT // 60} minutes; larger sizes were not tried."
            )
            break
        finally:
            sampler.done.set()
            sampler.join()
        elapsed = time.perf_counter() - started
        if process.returncode != 0:
            notes.append(f"{size:,} rows failed: {stderr[-800:]}")
            break
        report = last_json(stdout)
        if not report["success"]:
            notes.append(f"{size:,} rows: the run did not succeed (a check failed); see its steps below.")
        columns.append((size, scale_cells(report, sampler.peak)))
        from wine_assets.registry import MODEL_FILE

        model_file = workspace.root / "artifacts" / MODEL_FILE
        peak = max((rss for _, rss in sampler.samples), default=0)
        notes.append(scale_note(size, elapsed, peak, model_file.stat().st_size if model_file.exists() else None))
    return scale_lines(sizes, n_jobs, columns, notes)


def scale_cells(report: dict, peak: Callable[[float, float], int]) -> dict[str, str]:
    """One size's column: each step's wall time (from inprocess_run.py's report) and the peak memory
    while it ran (``peak(start, end)`` in bytes), or "skipped" for a step that did not end."""
    cells = {}
    for step, _ in STAGES:
        timing = report["steps"].get(step)
        if timing and "end" in timing:
            seconds = timing["end"] - timing["start"]
            cells[step] = f"{fmt(seconds)}, {peak(timing['start'], timing['end']) / 2**20:,.0f} MiB"
        else:
            cells[step] = "skipped"
    return cells


def scale_note(size: int, elapsed: float, peak: int, model_bytes: int | None) -> str:
    """A size's whole process: time, peak memory in bytes and the size of the model file (None: not written)."""
    if model_bytes is None:
        return f"{size:,} rows: whole process {fmt(elapsed)}."
    return (
        f"{size:,} rows: whole process {fmt(elapsed)}, peak memory {peak / 2**20:,.0f} MiB, "
        f"the model file {model_bytes / 2**20:,.1f} MiB."
    )


def scale_lines(
    sizes: Sequence[int], n_jobs: int, columns: Sequence[tuple[int, dict[str, str]]], notes: Sequence[str]
) -> list[str]:
    """Section 3: a column per size that finished, (size, scale_cells), in the order run; and the notes."""
    rows = ["| step |" + "".join(f" {size:,} rows |" for size, _ in columns), "|---|" + "---|" * len(columns)]
    if columns:
        for step, label in STAGES:
            rows.append(f"| {label} (`{step}`) | " + " | ".join(cells[step] for _, cells in columns) + " |")
    largest = f"{max(size for size, _ in columns):,}" if columns else "none"
    return [
        "## 3. Scale",
        "",
        "Synthetic data (`benchmarks/synthetic.py`: a seeded bootstrap of the 178 wines with gaussian "
        "jitter of 5% of each feature's spread, clipped to the schema's bounds) fed through the real "
        f"pipeline as a CSV source, in-process `materialize()`, with `model.n_jobs: {n_jobs}` and the other "
        "params at their defaults. Each cell: the step's wall time, and the process's peak resident "
        "memory while the step ran (sampled every 50 ms).",
        "",
        *rows,
        "",
        *[f"- {note}" for note in notes],
        "",
        f"Largest size run here within {STEP_TIMEOUT // 60} minutes per run: **{largest} rows** "
        f"(sizes tried: {', '.join(f'{s:,}' for s in sizes)}).",
        "",
    ]


# -- 4. scale-out -------------------------------------------------------------------------------
SCALEOUT_HEADING = "## 4. Scale-out: instance storage, executors, training on a cluster"
EXECUTOR_CONFIGS = {
    "in_process": None,
    "multiprocess": "execution:\n  config:\n    multiprocess: {}\n",
    "celery": (HERE.parent / "deploy" / "run-celery.yaml").read_text(),
}
NOOP = [str(BIN / "dagster"), "asset", "materialize", "-f", str(HERE / "noop_graph.py"), "--select"]


def _stop_group(process: subprocess.Popen) -> None:
    import signal

    for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(process.pid, sig)
            process.wait(timeout=wait)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


def _training_times(rows: int, address: str, runs: int) -> dict[str, list[float]]:
    from sklearn.preprocessing import StandardScaler

    from wine_assets.features import features_of
    from wine_assets.params import ModelParams
    from wine_assets.training import train_model

    frame = synthetic_frame(rows, seed=rows)
    scaler = StandardScaler().fit(features_of(frame))
    ways = {
        "local, n_jobs 1": ModelParams(n_jobs=1),
        "local, n_jobs -1": ModelParams(n_jobs=-1),
        "Dask cluster (2 workers x 1 thread)": ModelParams(dask_scheduler=address),
    }
    times: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(runs):
        for name, model_params in ways.items():
            times[name].append(train_model(frame, scaler, model_params).seconds)
    return times


def scaleout(tmp: Path, runs: int, noop_runs: int, multiprocess_runs: int, train_sizes: Sequence[int]) -> list[str]:
    """Each executor on SQLite and on PostgreSQL, against the servers of `make services`."""
    from wine_assets import services

    state, env_file = tmp / "services", tmp / "services.env"
    # A database of its own, so run history starts empty. A worker resolves the instance's
    # {env: ...} settings itself, so it gets the same DAGSTER_PG_DB as the launchers.
    server_env = {**services.up(state, env_file, timeout=120), "DAGSTER_PG_DB": "wine_bench"}
    services.create_database(
        "127.0.0.1", int(server_env["DAGSTER_PG_PORT"]), server_env["DAGSTER_PG_PASSWORD"], "wine_bench"
    )
    base_env = {**os.environ, **server_env, "PYTHONWARNINGS": "ignore"}
    whole: dict[tuple[str, str], list[float]] = {}
    noop: dict[tuple[str, str, int], list[float]] = {}
    worker = None
    try:
        for instance in ("sqlite", "postgres"):
            # A worker per instance, as in a deployment: each serves the instance its launchers use.
            if worker is not None:
                _stop_group(worker)
            worker = services.start_celery_worker(tmp / f"celery-worker-{instance}", base_env)
            for executor, config_text in EXECUTOR_CONFIGS.items():
                extra = ["-c", str(tmp / f"{executor}.yaml")] if config_text else []
                if config_text:
                    (tmp / f"{executor}.yaml").write_text(config_text)
                repeat = multiprocess_runs if executor == "multiprocess" else runs
                for index in range(repeat):
                    for kind in ("graph", 1, 21):
                        workspace = Workspace(tmp / f"so-{instance}-{executor}-{kind}-{index}")
                        env = dict(server_env)
                        if instance == "postgres":
                            shutil.copy(
                                HERE.parent / "deploy" / "dagster-postgres.yaml", workspace.home / "dagster.yaml"
                            )
                        if kind == "graph":
                            elapsed, _ = run([*CLI, *extra], workspace, env)
                            whole.setdefault((instance, executor), []).append(elapsed)
                        elif index < noop_runs:
                            elapsed, _ = run([*NOOP, f"group:chain_{kind}", *extra], workspace, env)
                            noop.setdefault((instance, executor, kind), []).append(elapsed)
        training = {rows: _training_times(rows, server_env["WINE_ASSETS_DASK_SCHEDULER"], 1) for rows in train_sizes}
    finally:
        if worker is not None:
            _stop_group(worker)
        services.purge(state, env_file)
    return scaleout_lines(runs, noop_runs, multiprocess_runs, whole, noop, training)


def scaleout_lines(
    runs: int,
    noop_runs: int,
    multiprocess_runs: int,
    whole: dict[tuple[str, str], list[float]],
    noop: dict[tuple[str, str, int], list[float]],
    training: dict[int, dict[str, list[float]]],
) -> list[str]:
    """Section 4 from its measurements: the whole graph per (instance, executor), the no-op chains of
    1 and 21 steps per (instance, executor, steps), and the training times per rows and way."""
    baseline = median(whole[("sqlite", "in_process")])
    lines = [
        SCALEOUT_HEADING,
        "",
        "The whole graph (`dagster asset materialize -m wine_assets --select '*'`, with `-c` for the executor) "
        "and chains of 1 and 21 no-op assets (`benchmarks/noop_graph.py`, the project's executor), each on "
        "the SQLite instance and on PostgreSQL (`deploy/dagster-postgres.yaml`), with the servers of "
        "`make services` and one Celery worker of two processes (`make worker`'s command) on this machine. "
        f"Runs per cell: {runs} for the graph ({multiprocess_runs} for multiprocess), {noop_runs} for the chains.",
        "",
        "| instance | executor | whole graph | x in-process SQLite | per step (no-op chains) | fixed (1-step chain) |",
        "|---|---|---|---|---|---|",
    ]
    for (instance, executor), values in whole.items():
        one, many = median(noop[(instance, executor, 1)]), median(noop[(instance, executor, 21)])
        lines.append(
            f"| {instance} | {executor} | {fmt(median(values))} ({', '.join(f'{v:.1f}' for v in values)}) | "
            f"{median(values) / baseline:.2f}x | {fmt((many - one) / 20)} | {fmt(one)} |"
        )
    lines += [
        "",
        "Training time of the forest alone (default model params, 100 trees; `train_model`, one run each; "
        "the Dask cluster is `make services`'s scheduler and two single-thread workers on this 2-core "
        "machine, so it shows the cost of shipping the work, not the speed of a real cluster):",
        "",
        "| rows | " + " | ".join(next(iter(training.values()))) + " |",
        "|---|" + "---|" * len(next(iter(training.values()))),
    ]
    for rows, times in training.items():
        lines.append(f"| {rows:,} | " + " | ".join(fmt(median(values)) for values in times.values()) + " |")
    lines.append("")
    return lines


def scaleout_skip_reason(smoke: bool, skip_scaleout: bool, missing: Sequence[str]) -> str | None:
    """Why section 4 is not run (the servers it needs that are not installed come first), or None."""
    if smoke or skip_scaleout or missing:
        return f"{', '.join(missing)} not installed" if missing else "`--smoke` or `--skip-scaleout`"
    return None


def servers_missing() -> list[str]:
    """Section 4 starts PostgreSQL and Redis from Debian's packages; what of them is not installed."""
    missing = [] if shutil.which("redis-server") else ["redis-server"]
    if not list(Path("/usr/lib/postgresql").glob("*/bin/postgres")) and not shutil.which("postgres"):
        missing.append("postgresql")
    return missing


def replace_section(text: str, heading: str, lines: list[str]) -> str:
    """The results file with one section (from its heading to the next '## ') replaced or appended."""
    body = text.rstrip("\n").split("\n")
    if heading in body:
        start = body.index(heading)
        end = next((i for i in range(start + 1, len(body)) if body[i].startswith("## ")), len(body))
        body[start:end] = lines
    else:
        body += ["", *lines]
    return "\n".join(body).rstrip() + "\n"


def only_section(command: str, output: Path, heading: str, measure: Callable[[Path], list[str]]) -> int:
    """Measure one section alone and replace it in the existing results file."""
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="wine-bench-") as scratch:
        lines = measure(Path(scratch))
    lines[1:1] = [
        "",
        f"Measured by `{command}` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(started))}, "
        f"in {(time.time() - started) / 60:.1f} minutes (the other sections by the run named above).",
    ]
    previous = output.read_text() if output.exists() else ""
    output.write_text(replace_section(previous, heading, lines))
    print(f"section {heading.split('.')[0].lstrip('# ')} written to {output}")
    return 0


# -- main --------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=HERE / "RESULTS.md")
    parser.add_argument(
        "--smoke", action="store_true", help="10^3 rows, one run of everything (keeps the script working)"
    )
    parser.add_argument(
        "--runs", type=int, default=5, help="runs of the bare script and of each Dagster way (default 5)"
    )
    parser.add_argument(
        "--sizes", type=lambda text: [int(float(x)) for x in text.split(",")], default=[10**3, 10**4, 10**5, 10**6]
    )
    parser.add_argument(
        "--n-jobs", type=int, default=-1, help="model.n_jobs for the scale runs (default -1: all cores)"
    )
    parser.add_argument(
        "--skip-setup", action="store_true", help="leave out section 0 (fresh clones; needs git, make and PyPI)"
    )
    parser.add_argument(
        "--only-scaleout",
        action="store_true",
        help="run only section 4 (needs PostgreSQL and Redis) and replace it in the existing --output file",
    )
    parser.add_argument(
        "--skip-scaleout", action="store_true", help="leave out section 4 (servers: PostgreSQL, Redis, Dask, Celery)"
    )
    parser.add_argument(
        "--only-serving",
        action="store_true",
        help="run only section 5 (needs wrk) and replace it in the existing --output file",
    )
    parser.add_argument(
        "--only-experiments",
        action="store_true",
        help="run only section 6 (the experiment grid) and replace it in the existing --output file",
    )
    return parser


@dataclass(frozen=True)
class Plan:
    """How many runs of what: `--smoke`'s one run of everything, or the measurement's."""

    runs: int
    multiprocess_runs: int
    noop_runs: int
    cold_runs: int
    sizes: list[int]
    reps: dict[int, int]
    large_rows: int
    large_runs: int
    setup_runs: tuple[int, int]  # section 0: fresh clones, pip installs


def plan_for(args: argparse.Namespace) -> Plan:
    if args.smoke:
        # No multiprocess run: a process per step is a minute of imports that measures nothing
        # here, and test_cli runs the same command with the multiprocess executor.
        return Plan(1, 0, 1, 1, [10**3], {1: 5, 1000: 3}, 10**3, 1, (1, 0))
    return Plan(args.runs, 2, args.runs, 5, args.sizes, {1: 300, 1000: 100, 100_000: 15}, 10**5, 3, (2, 1))


def report_text(command: str, started: float, finished: float, smoke: bool, sections: Sequence[list[str]]) -> str:
    """The results file: the command, when and how long (epoch seconds), the machine, then the sections."""
    text = "\n".join(
        [
            "# Benchmark results",
            "",
            f"Made by `{command}` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(started))}, "
            f"in {(finished - started) / 60:.1f} minutes"
            + (" (smoke run: one run each, not a measurement)" if smoke else "")
            + ".",
            "",
            "The machine:",
            "",
            *machine_lines(),
            "",
            *(line for section in sections for line in section),
        ]
    )
    return text.rstrip() + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    command = shlex.join(["python", "benchmarks/run.py", *(argv if argv is not None else sys.argv[1:])])
    if args.only_experiments:
        return only_section(command, args.output, EXPERIMENTS_HEADING, lambda tmp: experiments(tmp, smoke=args.smoke))
    if args.only_serving:
        return only_section(command, args.output, SERVING_HEADING, lambda tmp: serving(tmp, smoke=args.smoke))
    if args.only_scaleout:
        if servers_missing():
            parser.error(f"section 4 needs {', '.join(servers_missing())} (apt-get install postgresql redis-server)")
        return only_section(command, args.output, SCALEOUT_HEADING, lambda tmp: scaleout(tmp, 2, 2, 1, [10**5, 10**6]))
    plan = plan_for(args)

    started = time.time()
    with tempfile.TemporaryDirectory(prefix="wine-bench-") as scratch:
        tmp = Path(scratch)
        setup_section = [] if args.skip_setup else setup(tmp, *plan.setup_runs)
        overhead_section, released = overhead(tmp, plan.runs, plan.multiprocess_runs, plan.noop_runs)
        overhead_section += overhead_at_size(tmp, plan.large_rows, plan.large_runs)
        prediction_section = prediction(released, tmp, plan.cold_runs, plan.reps)
        scale_section = scale(tmp, plan.sizes, args.n_jobs)
        why = scaleout_skip_reason(args.smoke, args.skip_scaleout, servers_missing())
        if why is not None:
            scaleout_section = [SCALEOUT_HEADING, "", f"Not run ({why}).", ""]
        else:
            scaleout_section = scaleout(tmp, 2, 2, 1, [10**5, 10**6])
        serving_section = serving(tmp, smoke=args.smoke)
        experiments_section = experiments(tmp, smoke=args.smoke)
    sections = [
        setup_section,
        overhead_section,
        prediction_section,
        scale_section,
        scaleout_section,
        serving_section,
        experiments_section,
    ]
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(report_text(command, started, time.time(), args.smoke, sections))
    print(f"results written to {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
