"""Section 5 of the benchmarks: `wine-assets serve` under load, beside two other servers of the same model.

* ours: `wine-assets serve --workers 1` (prediction log on, as by default);
* baseline: a plain FastAPI wrapper of `wine_assets.predict.predict` (plain_fastapi.py), on
  the same uvicorn settings;
* MLflow's scoring server (`mlflow models serve`, one worker) on the same scaler and forest,
  installed with uv into a bench-only virtual environment; "not run" when that fails.

Load comes from wrk (Debian's package) in a second process: one-row POSTs of the same JSON body
(MLflow's `dataframe_split`, which all three accept), at 1, 16 and 64 connections, each run
repeated and taken alternately across servers; the table shows medians over the repeats.
Before the load, ours is checked against the batch path over HTTP: all 178 wines and 10^5
random in-bounds rows must give the same classes and probabilities within 1e-9.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
HEADING = "## 5. Serving: `wine-assets serve` under load"
MLFLOW_VERSION = "3.17.2"
ROW = [13.2, 1.78, 2.14, 11.2, 100.0, 2.65, 2.76, 0.26, 1.28, 4.38, 1.05, 3.4, 1050.0]


@dataclass
class Running:
    name: str
    process: subprocess.Popen
    url: str
    log: Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop(process: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(process.pid, sig)
            process.wait(wait)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


def start(name: str, argv: list[str], folder: Path, env: dict[str, str], port: int, ready: str) -> Running:
    log = folder / f"{name}.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            argv, cwd=folder, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited: {log.read_text()[-2000:]}")
        if post(url + ready, body(1), timeout=5)[0] == 200 or get_status(url + "/ping") == 200:
            return Running(name, process, url, log)
        time.sleep(0.2)
    stop(process)
    raise RuntimeError(f"{name} did not answer within 180 s: {log.read_text()[-2000:]}")


def get_status(url: str) -> int:
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status
    except OSError:
        return 0


def post(url: str, data: bytes, timeout: float = 60) -> tuple[int, bytes]:
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except OSError:
        return 0, b""


def body(rows: int = 1, values: np.ndarray | None = None) -> bytes:
    from wine_assets.validation import FEATURE_COLUMNS

    data = values.tolist() if values is not None else [ROW] * rows
    return json.dumps({"dataframe_split": {"columns": list(FEATURE_COLUMNS), "data": data}}).encode()


# -- wrk ---------------------------------------------------------------------------------------
_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}


def _seconds(text: str) -> float:
    number, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text).groups()
    return float(number) * _UNITS[unit]


def wrk_command(url: str, connections: int, seconds: int, script: Path) -> list[str]:
    threads = min(connections, 2)
    # --timeout 30s: a slow server's latency is measured, not cut off at wrk's default 2 s
    return [
        "wrk",
        "-t",
        str(threads),
        "-c",
        str(connections),
        "-d",
        f"{seconds}s",
        "--timeout",
        "30s",
        "--latency",
        "-s",
        str(script),
        url,
    ]


def wrk(url: str, connections: int, seconds: int, script: Path) -> dict[str, float]:
    out = subprocess.run(
        wrk_command(url, connections, seconds, script), capture_output=True, text=True, timeout=seconds + 120
    ).stdout
    return parse_wrk(out)


def parse_wrk(out: str) -> dict[str, float]:
    """wrk's report (with --latency): median and p99 latency in seconds, requests/s, failed and all requests."""
    latency = dict(re.findall(r"^\s+(50|99)%\s+(\S+)\s*$", out, re.M))
    requests = int(re.search(r"(\d+) requests in", out).group(1))
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    errors = (int(non_2xx.group(1)) if non_2xx else 0) + (
        sum(int(value) for value in socket_errors.groups()) if socket_errors else 0
    )
    return {
        "p50": _seconds(latency["50"]),
        "p99": _seconds(latency["99"]),
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
        "errors": errors,
        "requests": requests,
    }


def wrk_script(data: bytes) -> str:
    """wrk's Lua script: every request a POST of ``data`` (a JSON string is a valid Lua string)."""
    return (
        'wrk.method = "POST"\n'
        f"wrk.body = {json.dumps(data.decode())}\n"
        'wrk.headers["Content-Type"] = "application/json"\n'
    )


# -- the servers -------------------------------------------------------------------------------
def make_registry(folder: Path) -> Path:
    """A registry with v1 in production: the default forest on the built-in data's training split."""
    from wine_assets import model_format
    from wine_assets.features import fit_scaler, split_frame
    from wine_assets.ingestion import load_builtin_frame
    from wine_assets.params import ModelParams
    from wine_assets.registry import MODEL_FILE, REFERENCE_FILE, SCALER_FILE, ModelRegistry
    from wine_assets.training import train_model
    from wine_assets.validation import FEATURE_COLUMNS

    frame = load_builtin_frame()
    frame = frame.rename(columns=dict(zip(frame.columns[:13], FEATURE_COLUMNS, strict=True)))
    train, _ = split_frame(frame, 0.2, 42)
    scaler = fit_scaler(train)
    model = train_model(train, scaler, ModelParams()).model
    files = {
        MODEL_FILE: model_format.dumps(model),
        SCALER_FILE: model_format.dumps(scaler),
        REFERENCE_FILE: train.drop(columns="target").to_csv(index=False).encode(),
    }
    fields = {"class_values": [0, 1, 2], "class_labels": ["class_0", "class_1", "class_2"]}
    ModelRegistry(folder / "registry").publish(files, fields)
    return folder / "registry"


def mlflow_environment(folder: Path) -> tuple[Path | None, str]:
    """A bench-only venv with MLflow and this project's scikit-learn; (python, note)."""
    import sklearn
    import skops

    uv = shutil.which("uv") or str(HERE.parent / ".tools" / "uv" / "bin" / "uv")
    env_dir = folder / "mlflow-env"
    steps = [
        [uv, "venv", "-q", "--python", sys.executable, str(env_dir)],
        [
            uv,
            "pip",
            "install",
            "-q",
            "--python",
            str(env_dir / "bin" / "python"),
            f"mlflow=={MLFLOW_VERSION}",
            f"scikit-learn=={sklearn.__version__}",
            f"skops=={skops.__version__}",
        ],
    ]
    for step in steps:
        try:
            done = subprocess.run(step, capture_output=True, text=True, timeout=900)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return None, f"not run (could not install MLflow {MLFLOW_VERSION}: {exc})"
        if done.returncode != 0:
            return None, f"not run (could not install MLflow {MLFLOW_VERSION}: {done.stderr.strip()[-300:]})"
    return env_dir / "bin" / "python", f"MLflow {MLFLOW_VERSION} (bench-only venv, scikit-learn {sklearn.__version__})"


SAVE_MLFLOW_MODEL = """
import sys, pandas as pd, mlflow.sklearn, skops.io
from mlflow.models import infer_signature
from sklearn.pipeline import make_pipeline
registry, target, columns = sys.argv[1], sys.argv[2], sys.argv[3].split(",")
trusted = ["sklearn.tree._tree.Tree"]
pipeline = make_pipeline(skops.io.load(registry + "/scaler.skops", trusted=trusted),
                         skops.io.load(registry + "/model.skops", trusted=trusted))
example = pd.DataFrame([[float(x) for x in sys.argv[4].split(",")]], columns=columns)
# the forest was made by this benchmark a moment ago: its tree type may be loaded by skops
mlflow.sklearn.save_model(pipeline, target, signature=infer_signature(example, pipeline.predict_proba(example)),
                          pyfunc_predict_fn="predict_proba", skops_trusted_types=["sklearn.tree._tree.Tree"])
"""


def start_mlflow(python: Path, registry: Path, folder: Path) -> Running:
    """The same scaler and forest saved as an MLflow model, behind `mlflow models serve` (one worker)."""
    from wine_assets.registry import ModelRegistry
    from wine_assets.validation import FEATURE_COLUMNS

    version_dir = ModelRegistry(registry).version_dir(1)
    subprocess.run(
        [
            str(python),
            "-c",
            SAVE_MLFLOW_MODEL,
            str(version_dir),
            str(folder / "mlflow-model"),
            ",".join(FEATURE_COLUMNS),
            ",".join(map(str, ROW)),
        ],
        check=True,
        timeout=600,
        capture_output=True,
        text=True,
    )
    port = free_port()
    return start(
        "MLflow scoring server",
        [
            str(python.parent / "mlflow"),
            "models",
            "serve",
            "-m",
            str(folder / "mlflow-model"),
            "--env-manager",
            "local",
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
            "-w",
            "1",
        ],
        folder,
        # mlflow runs `uvicorn` by name: the bench venv's bin comes first on PATH
        {
            **os.environ,
            "PATH": f"{python.parent}:{os.environ.get('PATH', '')}",
            "MLFLOW_TRACKING_URI": f"file://{folder / 'mlruns'}",
        },
        port,
        "/invocations",
    )


def check_identical(url: str, registry: Path, rows: int) -> str:
    """Ours over HTTP against the batch path: classes equal and the largest probability difference."""
    from wine_assets.predict import clear_cache

    clear_cache()
    lines = []
    for name, values in check_rows(rows):
        served = []
        for begin in range(0, len(values), 10_000):
            status, content = post(url + "/invocations", body(values=values[begin : begin + 10_000]))
            if status != 200:
                raise RuntimeError(f"ours answered {status}: {content[:300]!r}")
            served.extend(json.loads(content)["predictions"])
        lines.append(compare_with_batch(name, values, served, registry))
    return "\n".join(lines)


def check_rows(rows: int) -> list[tuple[str, np.ndarray]]:
    """What check_identical sends: the 178 wines, and ``rows`` seeded random rows within the schema's bounds."""
    from wine_assets.ingestion import load_builtin_frame
    from wine_assets.validation import BOUNDS, FEATURE_COLUMNS

    wines = load_builtin_frame().iloc[:, :13].to_numpy()
    lows = np.array([BOUNDS[name][0] for name in FEATURE_COLUMNS])
    highs = np.array([BOUNDS[name][1] for name in FEATURE_COLUMNS])
    random_rows = lows + np.random.default_rng(5).random((rows, 13)) * (highs - lows)
    return [("the 178 wines", wines), (f"{rows:,} random in-bounds rows", random_rows)]


def compare_with_batch(name: str, values: np.ndarray, served: list[dict], registry: Path) -> str:
    """The served predictions (records) of ``values`` against `predict()` on them: the report's line,
    or RuntimeError when a class differs or a probability by more than 1e-9."""
    from wine_assets.predict import predict
    from wine_assets.validation import FEATURE_COLUMNS

    served_frame = pd.DataFrame(served)
    expected = predict(pd.DataFrame(values, columns=list(FEATURE_COLUMNS)), registry_dir=registry).predictions
    probabilities = [column for column in expected if column.startswith("probability_")]
    same_classes = bool((served_frame["predicted_class"].to_numpy() == expected["predicted_class"].to_numpy()).all())
    difference = float(np.abs(served_frame[probabilities].to_numpy() - expected[probabilities].to_numpy()).max())
    if not same_classes or difference > 1e-9:
        raise RuntimeError(f"ours differs from the batch path on {name}: classes {same_classes}, {difference}")
    return f"- {name}: same classes, largest probability difference {difference:.1e}"


def serving(tmp: Path, smoke: bool) -> list[str]:
    lines = [HEADING, ""]
    if shutil.which("wrk") is None:
        return [*lines, "Not run (wrk is not installed: apt-get install wrk).", ""]
    folder = tmp / "serving"
    folder.mkdir()
    registry = make_registry(folder)
    params = folder / "params.yaml"
    params.write_text(
        yaml.safe_dump(
            {"paths": {"registry_dir": str(registry)}, "serving": {"log_path": str(folder / "predictions.sqlite")}}
        )
    )
    env = {**os.environ, "WINE_ASSETS_PARAMS": str(params)}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    script = folder / "post.lua"
    script.write_text(wrk_script(body(1)))
    connections = [1] if smoke else [1, 16, 64]
    seconds, repeats = (1, 1) if smoke else (10, 3)
    servers: list[Running] = []
    mlflow_note = "not run (`--smoke`)"
    try:
        port = free_port()
        servers.append(
            start(
                "ours",
                [str(BIN / "wine-assets"), "serve", "--port", str(port), "--workers", "1"],
                folder,
                env,
                port,
                "/invocations",
            )
        )
        port = free_port()
        servers.append(
            start(
                "plain FastAPI + predict()",
                [
                    str(BIN / "uvicorn"),
                    "plain_fastapi:app",
                    "--app-dir",
                    str(HERE),
                    "--port",
                    str(port),
                    "--host",
                    "127.0.0.1",
                    "--http",
                    "httptools",
                    "--loop",
                    "uvloop",
                    "--log-level",
                    "warning",
                    "--no-access-log",
                ],
                folder,
                env,
                port,
                "/invocations",
            )
        )
        if not smoke:
            python, mlflow_note = mlflow_environment(folder)
            if python is not None:
                try:
                    servers.append(start_mlflow(python, registry, folder))
                except (subprocess.CalledProcessError, subprocess.TimeoutExpired, RuntimeError) as exc:
                    mlflow_note = f"not run ({str(exc)[-300:]})"
        identical = check_identical(servers[0].url, registry, 1_000 if smoke else 100_000)
        results: dict[tuple[str, int], list[dict[str, float]]] = {}
        for _ in range(repeats):
            for count in connections:
                for server in servers:
                    results.setdefault((server.name, count), []).append(
                        wrk(server.url + "/invocations", count, seconds, script)
                    )
    finally:
        for server in servers:
            stop(server.process)
    names = [server.name for server in servers]
    return [*lines, *serving_lines(seconds, repeats, mlflow_note, identical, connections, names, results)]


def serving_lines(
    seconds: int,
    repeats: int,
    mlflow_note: str,
    identical: str,
    connections: list[int],
    names: list[str],
    results: dict[tuple[str, int], list[dict[str, float]]],
) -> list[str]:
    """Section 5 after its heading, from wrk's results per (server name, connections); names: ours first."""
    lines = [
        f"One worker per server, one-row POSTs of the same `dataframe_split` body, wrk in a second process "
        f"({seconds} s per run, {repeats} run(s) per cell taken alternately; medians). MLflow: {mlflow_note}.",
        "",
        "Ours against the batch path (`wine_assets.predict.predict`) over HTTP:",
        "",
        identical,
        "",
        "| server | connections | p50 | p99 | requests/s | failed requests |",
        "|---|---|---|---|---|---|",
    ]
    for count in connections:
        for name in names:
            runs = results[(name, count)]
            lines.append(
                f"| {name} | {count} | {statistics.median(r['p50'] for r in runs) * 1000:.2f} ms "
                f"| {statistics.median(r['p99'] for r in runs) * 1000:.2f} ms "
                f"| {statistics.median(r['rps'] for r in runs):,.0f} | {int(sum(r['errors'] for r in runs))} "
                f"of {int(sum(r['requests'] for r in runs)):,} |"
            )
    lines.append("")
    ours = {count: statistics.median(r["rps"] for r in results[("ours", count)]) for count in connections}
    for name in names[1:]:
        ratios = ", ".join(
            f"{ours[count] / statistics.median(r['rps'] for r in results[(name, count)]):.1f}x at {count}"
            for count in connections
        )
        lines.append(f"Throughput of ours / {name}: {ratios} connection(s).")
    p50 = statistics.median(r["p50"] for r in results[("ours", 1)]) * 1000
    p99 = statistics.median(r["p99"] for r in results[("ours", 1)]) * 1000
    targets = [f"median {p50:.2f} ms (target <= 2 ms)", f"p99 {p99:.2f} ms (target <= 10 ms) at 1 connection"]
    if 16 in ours:
        errors = int(sum(r["errors"] for r in results[("ours", 16)]))
        targets.append(f"{ours[16]:,.0f} requests/s with {errors} failed at 16 connections (target >= 500, 0 failed)")
    lines += ["", "Targets, ours: " + "; ".join(targets) + ".", ""]
    return lines
