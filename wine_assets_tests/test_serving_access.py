"""Who may write to the serving API, and under which host name (``wine_assets.serving.access``):
bearer tokens configured as hashes (params or WINE_ASSETS_SERVING_TOKENS), 401/403 with the JSON
error body, labels recorded with their token's name, the Host allow-list, and
`wine-assets serving token new`. The app runs in-process under Starlette's TestClient."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml

from wine_assets.params import ParamsError, ServingParams, load_params
from wine_assets.serving.access import TOKENS_ENV, TokenConfigError, Tokens, allowed_hosts, hash_token, new_token
from wine_assets.serving.app import create_app
from wine_assets.serving.log import connect, record_feedback

from .serving_support import MODEL, ROW, TestClient, bearer, publish

LABELLER_TOKEN, READER_TOKEN = new_token(), new_token()
TOKENS = [
    {"name": "labeller", "sha256": hash_token(LABELLER_TOKEN), "scopes": ["feedback"]},
    {"name": "reader", "sha256": hash_token(READER_TOKEN), "scopes": ["predict"]},
]
TENSOR = {"inputs": [{"name": "wines", "shape": [1, 13], "datatype": "FP64", "data": ROW}]}


@pytest.fixture
def serve(monkeypatch, write_params, tmp_path, versions) -> Callable[..., contextlib.AbstractContextManager]:
    """``serve(**serving)``: the app over a registry with v1 in production, its lifespan running."""
    package_logger = logging.getLogger("wine_assets")
    for attribute in ("propagate", "level"):  # create_app points the package logger at stderr; undone after
        monkeypatch.setattr(package_logger, attribute, getattr(package_logger, attribute))
    monkeypatch.setattr(package_logger, "handlers", list(package_logger.handlers))
    monkeypatch.delenv(TOKENS_ENV, raising=False)
    publish(tmp_path / "registry", versions, 1)

    @contextlib.contextmanager
    def start(**serving) -> Iterator[TestClient]:
        settings = {"reload_interval_seconds": 0.1, "log_path": "predictions.sqlite", **serving}
        with TestClient(create_app(load_params(write_params(serving=settings)))) as client:
            deadline = time.monotonic() + 20
            host = {"host": serving.get("allowed_hosts", ["localhost"])[0]}
            while client.get("/ping", headers=host).status_code != 200:
                assert time.monotonic() < deadline, "no model ready within 20 s"
                time.sleep(0.02)
            yield client

    return start


def predicted_id(client: TestClient) -> str:
    answer = client.post("/invocations", json={"inputs": [ROW]})
    assert answer.status_code == 200, answer.text
    return answer.json()["predictions"][0]["prediction_id"]


def feedback_rows(path: Path) -> list[tuple]:
    with contextlib.closing(sqlite3.connect(path)) as connection:
        return connection.execute("SELECT prediction_id, true_class, labelled_by FROM feedback").fetchall()


def assert_error(response, status: int, code: str, words: str) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert body["error_code"] == code and body["error"] == body["message"]
    assert words in body["message"], body["message"]
    return body


# -- writes need a token ---------------------------------------------------------------------------------
@pytest.mark.component
def test_feedback_without_a_valid_token_is_refused_and_stores_nothing(serve, tmp_path):
    """The review's attack: false labels without credentials. Each refused label leaves the log as it
    was, so the owner's real label is then stored (not answered 409) with the owner's name."""
    with serve(tokens=TOKENS) as client:
        prediction_id = predicted_id(client)
        label = {"prediction_id": prediction_id, "true_class": 2}
        missing = client.post("/feedback", json=label)
        other_scheme = client.post("/feedback", json=label, headers={"Authorization": f"Basic {LABELLER_TOKEN}"})
        wrong = client.post("/feedback", json=label, headers=bearer(new_token()))
        the_hash = client.post("/feedback", json=label, headers=bearer(hash_token(LABELLER_TOKEN)))
        no_scope = client.post("/feedback", json=label, headers=bearer(READER_TOKEN))
        assert feedback_rows(tmp_path / "predictions.sqlite") == []
        owner = client.post("/feedback", json={**label, "true_class": 0}, headers=bearer(LABELLER_TOKEN))

    for refused in (missing, other_scheme):
        assert_error(refused, 401, "UNAUTHENTICATED", "send 'Authorization: Bearer <token>'")
        assert refused.headers["www-authenticate"] == 'Bearer realm="wine-assets"'
    for refused in (wrong, the_hash):  # the configured hash is not a token: it cannot be replayed from params
        assert_error(refused, 401, "UNAUTHENTICATED", "not one this server knows")
        assert 'error="invalid_token"' in refused.headers["www-authenticate"]
    assert_error(no_scope, 403, "PERMISSION_DENIED", "the token 'reader' does not have the scope 'feedback'")
    assert 'error="insufficient_scope"' in no_scope.headers["www-authenticate"]
    assert owner.status_code == 200, owner.text
    assert owner.json()["true_class"] == 0
    assert feedback_rows(tmp_path / "predictions.sqlite") == [(prediction_id, 0, "labeller")]


@pytest.mark.component
def test_with_no_token_configured_feedback_is_refused_and_says_how_to_configure_one(serve, tmp_path):
    with serve() as client:
        prediction_id = predicted_id(client)
        for headers in ({}, bearer(LABELLER_TOKEN)):
            refused = client.post("/feedback", json={"prediction_id": prediction_id, "true_class": 0}, headers=headers)
            body = assert_error(refused, 403, "PERMISSION_DENIED", "no token with the scope 'feedback' is configured")
            assert "wine-assets serving token new --name NAME" in body["message"]
            assert "serving.tokens" in body["message"] and TOKENS_ENV in body["message"]
    assert feedback_rows(tmp_path / "predictions.sqlite") == []


@pytest.mark.component
def test_tokens_from_the_environment_variable_are_accepted_beside_the_params(serve, monkeypatch, tmp_path):
    deploy_token = new_token()
    entries = [{"name": "deploy-bot", "sha256": hash_token(deploy_token), "scopes": ["feedback"]}]
    monkeypatch.setenv(TOKENS_ENV, json.dumps(entries))
    with serve(tokens=TOKENS[:1]) as client:
        first, second = predicted_id(client), predicted_id(client)
        by_env = client.post("/feedback", json={"prediction_id": first, "true_class": 1}, headers=bearer(deploy_token))
        by_params = client.post(
            "/feedback", json={"prediction_id": second, "true_class": 1}, headers=bearer(LABELLER_TOKEN)
        )
    assert by_env.status_code == 200 and by_params.status_code == 200, (by_env.text, by_params.text)
    assert sorted(feedback_rows(tmp_path / "predictions.sqlite")) == sorted(
        [(first, 1, "deploy-bot"), (second, 1, "labeller")]
    )


@pytest.mark.unit
@pytest.mark.parametrize(
    ("value", "words"),
    [
        ("[{name: a, sha256: abc}]", "0.sha256: String should match pattern"),
        ("{name: a}", "must be a list of {name, sha256, scopes}"),
        ("[{name: a, sha256: " + "0" * 64 + ", scopes: [admin]}]", "0.scopes.0"),
        ("[oops", "is not YAML or JSON"),
    ],
    ids=["short hash", "not a list", "unknown scope", "not yaml"],
)
def test_a_bad_token_variable_is_one_message_naming_it(value, words):
    with pytest.raises(TokenConfigError, match="WINE_ASSETS_SERVING_TOKENS") as raised:
        Tokens.from_settings(ServingParams(), {TOKENS_ENV: value})
    assert words in str(raised.value) and "\n" not in str(raised.value)


@pytest.mark.unit
def test_a_token_name_in_both_the_params_and_the_variable_is_refused():
    settings = ServingParams(tokens=TOKENS)
    again = json.dumps([{"name": "labeller", "sha256": hash_token(new_token())}])
    with pytest.raises(TokenConfigError, match="token name.s. labeller are in both serving.tokens and"):
        Tokens.from_settings(settings, {TOKENS_ENV: again})


@pytest.mark.unit
def test_params_refuse_a_repeated_token_name_or_hash_and_a_bad_host_pattern(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"serving": {"tokens": [TOKENS[0], {**TOKENS[1], "name": "labeller"}]}}))
    with pytest.raises(ParamsError, match="serving.tokens.*labeller appear more than once"):
        load_params(path)
    path.write_text(yaml.safe_dump({"serving": {"tokens": [TOKENS[0], {**TOKENS[0], "name": "copy"}]}}))
    with pytest.raises(ParamsError, match="serving.tokens.*the same sha256 appears under two names"):
        load_params(path)
    path.write_text(yaml.safe_dump({"serving": {"allowed_hosts": ["wine.*.example"]}}))
    with pytest.raises(ParamsError, match=r"serving.allowed_hosts.*only allowed as '\*.example.com'"):
        load_params(path)


# -- reads are open by default; serving.require_auth_for_predictions closes scoring -----------------------
@pytest.mark.component
def test_scoring_is_open_by_default_and_the_schema_says_which_operations_take_a_token(serve):
    with serve(tokens=TOKENS) as client:
        assert client.post("/invocations", json={"inputs": [ROW]}).status_code == 200
        assert client.post(f"{MODEL}/infer", json=TENSOR).status_code == 200
        schema = client.get("/openapi.json").json()
    assert "security" in schema["paths"]["/feedback"]["post"]
    assert "security" not in schema["paths"]["/invocations"]["post"]
    assert schema["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"


@pytest.mark.component
def test_require_auth_for_predictions_closes_scoring_but_not_health_or_metadata(serve):
    with serve(tokens=TOKENS, require_auth_for_predictions=True) as client:
        answers = {
            (path, who): client.post(path, json=body, headers=headers)
            for path, body in (("/invocations", {"inputs": [ROW]}), (f"{MODEL}/infer", TENSOR))
            for who, headers in (("none", {}), ("labeller", bearer(LABELLER_TOKEN)), ("reader", bearer(READER_TOKEN)))
        }
        pinned = client.post(f"{MODEL}/versions/1/infer", json=TENSOR)
        open_reads = [client.get(path).status_code for path in ("/ping", "/v2/health/ready", MODEL, "/version")]
        schema = client.get("/openapi.json").json()
    for path in ("/invocations", f"{MODEL}/infer"):
        assert_error(answers[path, "none"], 401, "UNAUTHENTICATED", "scope 'predict'")
        assert_error(answers[path, "labeller"], 403, "PERMISSION_DENIED", "does not have the scope 'predict'")
        assert answers[path, "reader"].status_code == 200, answers[path, "reader"].text
    assert_error(pinned, 401, "UNAUTHENTICATED", "scope 'predict'")
    assert open_reads == [200, 200, 200, 200]
    assert "security" in schema["paths"]["/invocations"]["post"]


# -- the Host header ----------------------------------------------------------------------------------
@pytest.mark.component
def test_a_host_not_allowed_gets_a_json_400_and_local_names_are_served(serve):
    with serve() as client:
        answers = {
            host: client.get("/v2/health/live", headers={"host": host})
            for host in ("localhost:8080", "127.0.0.1", "[::1]:8080", "LOCALHOST", "rebind.attacker.example", "")
        }
    for host in ("localhost:8080", "127.0.0.1", "[::1]:8080", "LOCALHOST"):
        assert answers[host].status_code == 200, (host, answers[host].text)
    for host in ("rebind.attacker.example", ""):
        assert_error(answers[host], 400, "BAD_REQUEST", "add it to serving.allowed_hosts")
        assert answers[host].headers["x-request-id"]  # answered by the API, like every other error
    assert "'rebind.attacker.example'" in answers["rebind.attacker.example"].json()["message"]


@pytest.mark.component
def test_allowed_hosts_from_the_params_replace_the_default(serve):
    with serve(allowed_hosts=["wine.example.com", "*.internal"]) as client:
        status = {
            host: client.get("/v2/health/live", headers={"host": host}).status_code
            for host in ("wine.example.com", "api.internal:8443", "localhost", "wine.example.com.evil")
        }
    assert status == {"wine.example.com": 200, "api.internal:8443": 200, "localhost": 400, "wine.example.com.evil": 400}


@pytest.mark.unit
def test_the_default_allowed_hosts_are_the_bind_host_and_the_local_names():
    assert allowed_hosts(ServingParams()) == ["127.0.0.1", "localhost", "[::1]"]
    assert allowed_hosts(ServingParams(host="wine.lan")) == ["wine.lan", "localhost", "127.0.0.1", "[::1]"]
    assert allowed_hosts(ServingParams(host="0.0.0.0")) == ["localhost", "127.0.0.1", "[::1]"]
    assert allowed_hosts(ServingParams(host="::1")) == ["[::1]", "localhost", "127.0.0.1"]
    assert allowed_hosts(ServingParams(allowed_hosts=["*"])) == ["*"]


# -- text that is not text ----------------------------------------------------------------------------
@pytest.mark.component
def test_a_lone_surrogate_in_a_json_string_is_a_400_not_a_500(serve, tmp_path):
    with serve(tokens=TOKENS) as client:
        prediction_id = predicted_id(client)
        lone = client.post(
            "/feedback",
            content=b'{"prediction_id": "\\ud800", "true_class": 0}',
            headers={"content-type": "application/json", **bearer(LABELLER_TOKEN)},
        )
        in_a_column = client.post(
            "/invocations",
            content=b'{"inputs": {"\\udfff": [1]}}',
            headers={"content-type": "application/json"},
        )
        paired = client.post(  # a correct pair is text (an emoji): an unknown id, not malformed
            "/feedback",
            content=b'{"prediction_id": "\\ud83c\\udf47", "true_class": 0}',
            headers={"content-type": "application/json", **bearer(LABELLER_TOKEN)},
        )
        still = client.post(
            "/feedback", json={"prediction_id": prediction_id, "true_class": 0}, headers=bearer(LABELLER_TOKEN)
        )
    for refused in (lone, in_a_column):
        assert_error(refused, 400, "MALFORMED_REQUEST", "escape without its pair")
    assert_error(paired, 404, "RESOURCE_DOES_NOT_EXIST", "no prediction with id")
    assert still.status_code == 200
    assert feedback_rows(tmp_path / "predictions.sqlite") == [(prediction_id, 0, "labeller")]


# -- the log records who labelled ---------------------------------------------------------------------
@pytest.mark.unit
def test_a_log_from_before_token_names_gains_the_column_and_keeps_its_rows(tmp_path):
    path = tmp_path / "old.sqlite"
    with contextlib.closing(sqlite3.connect(path)) as old:
        old.execute("CREATE TABLE feedback (prediction_id TEXT PRIMARY KEY, true_class INTEGER NOT NULL, created REAL)")
        old.execute("INSERT INTO feedback VALUES ('p-0', 1, 1.0)")
        old.commit()
    with contextlib.closing(connect(path)) as connection, contextlib.closing(connect(path)) as second_worker:
        assert record_feedback(connection, "p-1", 2, "labeller") == (2, True)
        assert record_feedback(second_worker, "p-1", 2, "someone-else") == (2, False)  # kept once, first name
    assert sorted(feedback_rows(path)) == [("p-0", 1, None), ("p-1", 2, "labeller")]


# -- wine-assets serving token new --------------------------------------------------------------------
@pytest.mark.component
def test_token_new_prints_a_fresh_token_once_and_the_entry_a_server_then_accepts(wine_assets_cli, serve, tmp_path):
    made = wine_assets_cli("serving", "token", "new", "--name", "alice", cwd=tmp_path)
    again = wine_assets_cli("serving", "token", "new", "--name", "alice", "--scope", "predict", "--scope", "feedback")
    assert made.returncode == 0 and made.stderr == "", made.stderr
    lines = made.stdout.splitlines()
    assert len(lines) == 4 and "shown this once" in lines[0]
    token = lines[1]
    (entry,) = yaml.safe_load(lines[3])
    assert entry == {"name": "alice", "sha256": hashlib.sha256(token.encode()).hexdigest(), "scopes": ["feedback"]}
    assert token not in lines[3] and len(token) >= 43
    second = again.stdout.splitlines()
    assert second[1] != token and yaml.safe_load(second[3])[0]["scopes"] == ["predict", "feedback"]
    with serve(tokens=[entry]) as client:
        prediction_id = predicted_id(client)
        accepted = client.post(
            "/feedback", json={"prediction_id": prediction_id, "true_class": 1}, headers=bearer(token)
        )
    assert accepted.status_code == 200, accepted.text
    assert feedback_rows(tmp_path / "predictions.sqlite") == [(prediction_id, 1, "alice")]


@pytest.mark.component
def test_token_new_refuses_a_bad_name_in_one_line(wine_assets_cli, tmp_path):
    refused = wine_assets_cli("serving", "token", "new", "--name", "two words", cwd=tmp_path)
    assert refused.returncode == 2 and refused.stdout == ""
    assert refused.stderr.count("\n") == 1 and "--name 'two words'" in refused.stderr


@pytest.mark.component
def test_serve_refuses_a_bad_token_variable_before_any_worker_starts(wine_assets_cli, monkeypatch, tmp_path):
    monkeypatch.setenv(TOKENS_ENV, "[{name: a, sha256: not-a-hash}]")
    refused = wine_assets_cli("serve", "--port", "1", cwd=tmp_path)
    assert refused.returncode == 2 and refused.stdout == ""
    assert refused.stderr.count("\n") == 1 and TOKENS_ENV in refused.stderr
