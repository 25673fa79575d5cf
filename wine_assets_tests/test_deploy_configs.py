"""deploy/: the Prometheus configs and rules, the Grafana dashboard, the Dockerfile and the compose file.

Checked with the real tools (promtool, hadolint, check-jsonschema, all offline) and against the
metrics that wine_assets/serving/metrics.py exports, so a renamed metric breaks a test here rather
than a dashboard panel or an alert that silently never fires. No server or container is started.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import prometheus_client
import pytest
import yaml

from wine_assets.params import load_params
from wine_assets.serving import metrics

from .support import REPO_ROOT, find_program, require_programs

BIN = Path(sys.executable).parent
DEPLOY = REPO_ROOT / "deploy"
PROMETHEUS_DIR = DEPLOY / "prometheus"
RULES = PROMETHEUS_DIR / "rules.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "wine-serving.json"
DOCKERFILE = DEPLOY / "Dockerfile"
COMPOSE = DEPLOY / "compose.yaml"
SERVING_PARAMS = DEPLOY / "serving-params.yaml"
ALERTS = {
    "WineServingTargetDown",
    "WineServingHighErrorRatio",
    "WineServingHighClientErrorRatio",
    "WineServingHighP99Latency",
    "WineServingWorkersOnDifferentVersions",
    "WineServingReloadFailures",
}
PREDICTION_ENDPOINTS = {"/invocations", "/v2/models/{name}/infer", "/v2/models/{name}/versions/{version}/infer"}
# A PromQL identifier of this project: a metric (wine_serving_...) or a recording rule (wine_serving:...).
PROJECT_NAME = re.compile(r"(?<![\w:])wine_serving[\w:]*")
QUOTED = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')


def run(*args: str | Path, cwd: Path = REPO_ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(arg) for arg in args], cwd=cwd, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def promtool() -> str:
    require_programs("promtool")
    return str(find_program("promtool"))


def load_yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def rules() -> list[dict]:
    return [rule for group in load_yaml(RULES)["groups"] for rule in group["rules"]]


def dashboard_panels() -> list[dict]:
    return [panel for panel in json.loads(DASHBOARD.read_text())["panels"] if panel["type"] != "row"]


def dashboard_exprs() -> list[str]:
    return [target["expr"] for panel in dashboard_panels() for target in panel["targets"]]


def names_in(expr: str) -> set[str]:
    """The project's metric and recording-rule names an expression reads (label values left out)."""
    return set(PROJECT_NAME.findall(QUOTED.sub('""', expr)))


def exported_samples() -> set[str]:
    """Every sample name the server can expose, from the collectors defined in the metrics module."""
    samples = set()
    for value in vars(metrics).values():
        if isinstance(value, prometheus_client.Counter):
            # prometheus_client strips _total from a counter's _name and puts it back on the sample.
            samples |= {f"{value._name}_total", f"{value._name}_created"}
        elif isinstance(value, prometheus_client.Histogram):
            samples |= {f"{value._name}{suffix}" for suffix in ("_bucket", "_count", "_sum", "_created")}
        elif isinstance(value, prometheus_client.Gauge):
            samples.add(value._name)
    return samples


# -- Prometheus -------------------------------------------------------------------------------------
@pytest.mark.integration
@pytest.mark.parametrize("config", ["prometheus.yml", "prometheus-compose.yml"])
def test_promtool_accepts_the_prometheus_configs_and_their_rule_files(promtool, config):
    checked = run(promtool, "check", "config", PROMETHEUS_DIR / config)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "1 rule files found" in checked.stdout


@pytest.mark.unit
def test_the_configs_scrape_the_serving_api():
    targets = {}
    for config in ("prometheus.yml", "prometheus-compose.yml"):
        document = load_yaml(PROMETHEUS_DIR / config)
        assert document["rule_files"] == ["rules.yml"]
        (job,) = document["scrape_configs"]
        assert job["job_name"] == "wine-serving"
        assert job["metrics_path"] == "/metrics" and job["scrape_interval"] == "5s"
        targets[config] = [target for static in job["static_configs"] for target in static["targets"]]
    assert targets == {"prometheus.yml": ["127.0.0.1:8080"], "prometheus-compose.yml": ["api:8080"]}


@pytest.mark.integration
def test_promtool_accepts_the_rules(promtool):
    checked = run(promtool, "check", "rules", RULES)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS" in checked.stdout


@pytest.mark.integration
def test_the_rules_unit_tests_pass(promtool):
    tested = run(promtool, "test", "rules", PROMETHEUS_DIR / "rules_test.yml")
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout


@pytest.mark.integration
def test_promtool_rejects_a_broken_expression_in_the_rules_and_in_the_config(promtool, tmp_path):
    text = RULES.read_text()
    assert 'expr: up{job="wine-serving"} == 0' in text
    broken = text.replace('expr: up{job="wine-serving"} == 0', 'expr: up{job="wine-serving"} ==')
    (tmp_path / "rules.yml").write_text(broken)
    shutil.copy(PROMETHEUS_DIR / "prometheus.yml", tmp_path / "prometheus.yml")

    checked = run(promtool, "check", "rules", tmp_path / "rules.yml")
    assert checked.returncode != 0
    assert "parse error" in checked.stdout + checked.stderr
    configured = run(promtool, "check", "config", tmp_path / "prometheus.yml")
    assert configured.returncode != 0


@pytest.mark.integration
def test_the_unit_tests_catch_a_changed_threshold(promtool, tmp_path):
    """The alert tests pin the behaviour: a 5xx threshold raised from 1% to 50% fails them."""
    text = RULES.read_text()
    threshold = "expr: wine_serving:request_error_ratio:rate5m > 0.01\n"
    assert threshold in text
    (tmp_path / "rules.yml").write_text(text.replace(threshold, threshold.replace("0.01", "0.5")))
    shutil.copy(PROMETHEUS_DIR / "rules_test.yml", tmp_path / "rules_test.yml")
    tested = run(promtool, "test", "rules", tmp_path / "rules_test.yml")
    assert tested.returncode != 0
    assert "WineServingHighErrorRatio" in tested.stdout + tested.stderr


@pytest.mark.unit
def test_every_alert_exists_with_a_duration_a_severity_and_what_to_do():
    alerts = {rule["alert"]: rule for rule in rules() if "alert" in rule}
    assert ALERTS <= set(alerts)
    for name, rule in alerts.items():
        assert "for" in rule, name
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, name
        assert rule["annotations"]["summary"] and len(rule["annotations"]["description"]) > 80, name
    assert alerts["WineServingTargetDown"]["for"] == "1m"
    assert 'up{job="wine-serving"} == 0' in alerts["WineServingTargetDown"]["expr"]
    latency = alerts["WineServingHighP99Latency"]["expr"]
    (pattern,) = re.findall(r'endpoint=~"([^"]*)"', latency)
    assert set(pattern.split("|")) == PREDICTION_ENDPOINTS


@pytest.mark.unit
def test_every_test_in_rules_test_names_an_existing_alert():
    tests = load_yaml(PROMETHEUS_DIR / "rules_test.yml")["tests"]
    tested = {case["alertname"] for test in tests for case in test.get("alert_rule_test", [])}
    assert tested == {rule["alert"] for rule in rules() if "alert" in rule}
    recorded = {rule["record"] for rule in rules() if "record" in rule}
    checked = set()
    for test in tests:
        for case in test.get("promql_expr_test", []):
            checked |= names_in(case["expr"])
    assert checked <= recorded
    assert {
        "wine_serving:request_error_ratio:rate5m",
        "wine_serving:request_duration_seconds:p99_5m",
        "wine_serving:feedback_accuracy:ratio_1h",
    } <= checked


# -- metric names against the server's -----------------------------------------------------------------
@pytest.mark.unit
def test_the_metrics_module_exports_the_documented_metrics():
    samples = exported_samples()
    for name in (
        "wine_serving_requests_total",
        "wine_serving_request_duration_seconds_bucket",
        "wine_serving_requests_in_flight",
        "wine_serving_model_version",
        "wine_serving_model_reloads_total",
        "wine_serving_feedback_total",
    ):
        assert name in samples
    assert "wine_serving_requests_total_total" not in samples


@pytest.mark.unit
@pytest.mark.parametrize("source", ["rules.yml", "wine-serving.json"])
def test_every_metric_the_rules_and_the_dashboard_read_is_exported(source):
    exprs = [rule["expr"] for rule in rules()] if source == "rules.yml" else dashboard_exprs()
    recorded = {rule["record"] for rule in rules() if "record" in rule}
    samples = exported_samples()
    read = set().union(*(names_in(expr) for expr in exprs))
    assert read, "no metric found: the pattern does not match the expressions"
    unknown_metrics = {name for name in read if ":" not in name} - samples
    unknown_rules = {name for name in read if ":" in name} - recorded
    assert not unknown_metrics, f"not exported by wine_assets/serving/metrics.py: {sorted(unknown_metrics)}"
    assert not unknown_rules, f"not recorded in rules.yml: {sorted(unknown_rules)}"


@pytest.mark.unit
def test_names_in_sees_metrics_and_rules_but_not_label_values():
    expr = 'sum(rate(wine_serving_requests_total{endpoint="wine_serving_x"}[5m])) / wine_serving:a:b'
    assert names_in(expr) == {"wine_serving_requests_total", "wine_serving:a:b"}


@pytest.mark.integration
def test_every_dashboard_query_parses_as_promql(promtool, tmp_path):
    """Grafana's interval variables replaced, each panel's query checked as a recording rule would be."""
    exprs = [re.sub(r"\$__(rate_)?interval|\$__range", "5m", expr) for expr in dashboard_exprs()]
    group = {"name": "dashboard", "rules": [{"record": f"dashboard:query_{i}", "expr": e} for i, e in enumerate(exprs)]}
    (tmp_path / "queries.yml").write_text(yaml.safe_dump({"groups": [group]}))
    checked = run(promtool, "check", "rules", tmp_path / "queries.yml")
    assert checked.returncode == 0, checked.stdout + checked.stderr


# -- Grafana ------------------------------------------------------------------------------------------
@pytest.mark.unit
def test_the_dashboard_has_the_panels_and_uses_the_provisioned_datasource():
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "wine-serving" and dashboard["schemaVersion"] >= 39
    panels = dashboard_panels()
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in panels:
        assert panel["datasource"]["uid"] == "prometheus", panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == {"type": "prometheus", "uid": "prometheus"}, panel["title"]
    titles = " | ".join(panel["title"].lower() for panel in panels)
    for words in (
        "request rate",
        "error ratio",
        "p50 / p99",
        "in flight",
        "predictions by version",
        "rejected rows",
        "model version per worker",
        "reloads by outcome",
        "feedback accuracy",
        "shadow agreement",
    ):
        assert words in titles
    worker = next(panel for panel in panels if panel["title"] == "Model version per worker")
    assert any("{{worker}}" in target["legendFormat"] for target in worker["targets"])

    datasources = load_yaml(DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yaml")["datasources"]
    assert datasources == [
        {
            "name": "Prometheus",
            "type": "prometheus",
            "uid": "prometheus",
            "access": "proxy",
            "url": "http://prometheus:9090",
            "isDefault": True,
            "editable": False,
            "jsonData": {"timeInterval": "5s"},
        }
    ]
    (provider,) = load_yaml(DEPLOY / "grafana" / "provisioning" / "dashboards" / "wine-serving.yaml")["providers"]
    assert provider["type"] == "file" and provider["options"]["path"] == "/var/lib/grafana/dashboards"


# -- the image ----------------------------------------------------------------------------------------
def hadolint(dockerfile: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    return run(BIN / "hadolint", "--no-color", "--format", "json", dockerfile, cwd=cwd)


@pytest.mark.integration
def test_hadolint_finds_nothing_in_the_dockerfile():
    linted = hadolint(DOCKERFILE, REPO_ROOT)
    assert linted.returncode == 0, linted.stdout + linted.stderr
    assert json.loads(linted.stdout or "[]") == []


@pytest.mark.integration
def test_hadolint_flags_an_unpinned_image_and_package(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get install curl\n")
    linted = hadolint(bad, tmp_path)
    assert linted.returncode != 0
    codes = {finding["code"] for finding in json.loads(linted.stdout)}
    assert {"DL3007", "DL3008"} <= codes  # the latest tag; apt-get without versions


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments left out."""
    lines = [line for line in path.read_text().splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n\s*", " ", "\n".join(lines))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in joined.splitlines() if line.strip()]


@pytest.mark.unit
def test_the_dockerfile_pins_its_base_runs_as_a_user_and_checks_readiness():
    steps = instructions(DOCKERFILE)
    stages = set()
    for kind, args in steps:
        if kind == "FROM":
            words = [word for word in args.split() if not word.startswith("--")]
            image = words[0]
            if image not in stages:
                name, _, tag = image.rpartition(":")
                assert name and tag and tag != "latest" and re.search(r"\d+\.\d+\.\d+", tag), image
            if len(words) == 3 and words[1].upper() == "AS":
                stages.add(words[2])
    assert len(stages) >= 2  # builder and runtime
    final = steps[max(i for i, (kind, _) in enumerate(steps) if kind == "FROM") :]
    users = [args for kind, args in final if kind == "USER"]
    assert users and users[-1].split(":")[0] not in {"root", "0"}
    (healthcheck,) = [args for kind, args in final if kind == "HEALTHCHECK"]
    assert "/v2/health/ready" in healthcheck and "urllib" in healthcheck
    assert ("EXPOSE", "8080") in final
    assert any(kind == "ENV" and "/app/.venv/bin" in args for kind, args in final)
    entry = [json.loads(args) for kind, args in final if kind in {"ENTRYPOINT", "CMD"}]
    assert [word for part in entry for word in part] == [
        "wine-assets",
        "--params",
        "/srv/params.yaml",
        "serve",
        "--host",
        "0.0.0.0",
    ]
    uv = [args for kind, args in steps if kind == "RUN" and "uv==" in args]
    assert uv and re.search(r"uv==\d+\.\d+\.\d+", uv[0])
    syncs = [args for kind, args in steps if kind == "RUN" and "uv sync" in args]
    assert len(syncs) == 2 and all("--frozen" in sync and "--no-dev" in sync for sync in syncs)
    assert "--no-install-project" in syncs[0]


@pytest.mark.unit
def test_the_dockerignore_lets_in_exactly_what_the_dockerfile_copies():
    ignore = [line for line in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines() if line and line[0] != "#"]
    assert ignore[0] == "*"
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    copied = set()
    for kind, args in instructions(DOCKERFILE):
        if kind == "COPY" and "--from=" not in args:
            copied |= {source.rstrip("/").removeprefix("./") for source in args.split()[:-1] if source[:2] != "--"}
    assert copied == allowed
    for path in copied:
        assert (REPO_ROOT / path).exists(), path


# -- compose ------------------------------------------------------------------------------------------
def check_compose(path: Path) -> subprocess.CompletedProcess[str]:
    # The compose specification's schema ships inside check-jsonschema: no network is needed.
    return run(BIN / "check-jsonschema", "--builtin-schema", "vendor.compose-spec", path)


@pytest.mark.integration
def test_the_compose_file_follows_the_compose_specification():
    checked = check_compose(COMPOSE)
    assert checked.returncode == 0, checked.stdout + checked.stderr


@pytest.mark.integration
@pytest.mark.parametrize(
    "document",
    [
        {"version": "3.8", "services": {"api": {"image": "x"}}, "networks_typo": {}},
        {"services": {"api": {"image": "x", "ports": [{"target": "eighty", "published": [8080]}]}}},
    ],
    ids=["unknown-top-level-key", "port-of-the-wrong-type"],
)
def test_check_jsonschema_rejects_a_wrong_compose_file(tmp_path, document):
    path = tmp_path / "compose.yaml"
    path.write_text(yaml.safe_dump(document))
    checked = check_compose(path)
    assert checked.returncode != 0
    assert "Schema validation errors" in checked.stdout + checked.stderr


def published_host_ips(service: dict) -> list[str]:
    ips = []
    for port in service.get("ports", []):
        if isinstance(port, dict):
            ips.append(port.get("host_ip", "0.0.0.0"))
        else:
            parts = str(port).split(":")
            ips.append(parts[0] if len(parts) == 3 else "0.0.0.0")
    return ips


@pytest.mark.unit
def test_compose_publishes_only_on_localhost_and_holds_no_secret():
    compose = load_yaml(COMPOSE)
    assert "version" not in compose
    services = compose["services"]
    assert set(services) == {"api", "prometheus", "grafana"}
    for name, service in services.items():
        ips = published_host_ips(service)
        assert ips and set(ips) == {"127.0.0.1"}, name
        image = service.get("image", "")
        if "build" not in service:
            assert re.fullmatch(r"[\w./-]+:v?\d+\.\d+\.\d+", image), image
    assert published_host_ips({"ports": ["8080:8080"]}) == ["0.0.0.0"]

    api = services["api"]
    assert api["build"] == {"context": "..", "dockerfile": "deploy/Dockerfile"}
    assert "../registry:/srv/registry:ro" in api["volumes"]
    assert "./serving-params.yaml:/srv/params.yaml:ro" in api["volumes"]
    state = [volume for volume in api["volumes"] if volume.endswith(":/srv/state")]
    assert state and state[0].split(":")[0] in compose["volumes"]

    prometheus = services["prometheus"]
    assert "./prometheus:/etc/prometheus:ro" in prometheus["volumes"]
    assert "--config.file=/etc/prometheus/prometheus-compose.yml" in prometheus["command"]

    grafana = services["grafana"]
    password = grafana["environment"]["GF_SECURITY_ADMIN_PASSWORD"]
    assert password == "${GRAFANA_ADMIN_PASSWORD:?set GRAFANA_ADMIN_PASSWORD}"
    assert "./grafana/provisioning:/etc/grafana/provisioning:ro" in grafana["volumes"]
    assert "./grafana/dashboards:/var/lib/grafana/dashboards:ro" in grafana["volumes"]

    secret = re.compile(r"(?i)(password|secret|token)\s*[:=]\s*['\"]?(?!\$\{)\w")
    assert secret.search("GF_SECURITY_ADMIN_PASSWORD: hunter2")
    for path in [COMPOSE, DOCKERFILE, SERVING_PARAMS, *(DEPLOY / "grafana").rglob("*.yaml"), *PROMETHEUS_DIR.glob("*")]:
        assert not secret.search(path.read_text()), path


@pytest.mark.unit
def test_the_serving_params_load_and_point_into_the_mounts():
    params = load_params(SERVING_PARAMS)
    assert params.registry_dir == Path("/srv/registry")
    assert params.serving_log_path == Path("/srv/state/predictions.sqlite")
    assert params.artifacts_dir == Path("/srv/state/artifacts")
    assert (params.serving.host, params.serving.port, params.serving.workers) == ("0.0.0.0", 8080, 2)
