"""The deployment workflow's scripts, run for real: git, jq, the wine-assets command and a registry.

GitHub itself is out of reach here, so `gh` is a stand-in that keeps releases in a JSON file
and tags in the test's git repository (as GitHub would for the repository it hosts). The
scripts' own decisions are what is under test: which release is production, which number is
next, whether a commit may be deployed, and what is published.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from wine_assets.registry import ModelRegistry

from .support import REPO_ROOT, require_programs, tiny_model_files

pytestmark = pytest.mark.integration
SCRIPTS = REPO_ROOT / ".github" / "scripts"
DEPLOYMENT = REPO_ROOT / ".github" / "workflows" / "model-deployment.yml"
BIN = Path(sys.executable).parent

FAKE_GH = """
import json, os, shutil, subprocess, sys
from fnmatch import fnmatch
from pathlib import Path

state_path = Path(os.environ["FAKE_GH_STATE"])
repo = os.environ["FAKE_GH_REPO"]
state = json.loads(state_path.read_text())
words = sys.argv[1:]


def option(name, default=None):
    return words[words.index(name) + 1] if name in words else default


def answer(data):
    text = json.dumps(data)
    query = option("--jq")
    if query is None:
        print(text)
        return 0
    done = subprocess.run(["jq", "-r", query], input=text, capture_output=True, text=True)
    sys.stdout.write(done.stdout)
    sys.stderr.write(done.stderr)
    return done.returncode


def find(tag):
    return next((release for release in state["releases"] if release["tagName"] == tag), None)


def git(*args):
    return subprocess.run(["git", "-C", repo, *args], capture_output=True, text=True)


def main():
    if words[:2] == ["release", "list"] and os.environ.get("FAKE_GH_FAIL") == "release list":
        print("HTTP 502: Bad Gateway", file=sys.stderr)
        return 1
    if words[:2] == ["release", "list"]:
        releases = [r for r in state["releases"] if not (r["isDraft"] and "--exclude-drafts" in words)]
        return answer([{"tagName": r["tagName"], "isDraft": r["isDraft"]} for r in releases])
    if words[:2] == ["release", "view"]:
        release = find(words[2])
        if release is None:
            print("release not found", file=sys.stderr)
            return 1
        return answer({"isDraft": release["isDraft"], "assets": [{"name": n} for n in release["assets"]]})
    if words[:2] == ["release", "download"]:
        release, target = find(words[2]), Path(option("--dir", "."))
        names = [n for n in (release or {"assets": {}})["assets"] if fnmatch(n, option("--pattern", "*"))]
        if not names:
            print("no assets to download", file=sys.stderr)
            return 1
        target.mkdir(parents=True, exist_ok=True)
        for name in names:
            shutil.copy(release["assets"][name], target / name)
        return 0
    if words[0] == "api" and "/git/matching-refs/tags/" in words[1]:
        prefix = "refs/tags/" + words[1].split("/git/matching-refs/tags/", 1)[1]
        listed = git("for-each-ref", "--format=%(refname) %(objectname)", prefix + "*").stdout.splitlines()
        refs = [line.split() for line in listed if line.strip()]
        return answer([{"ref": name, "object": {"type": "commit", "sha": sha}} for name, sha in refs])
    if words[:2] == ["release", "create"]:
        tag, files = words[2], [w for w in words[3:] if not w.startswith("--")]
        asset = Path(files[0]).resolve()
        if git("rev-parse", "--verify", "--quiet", "refs/tags/" + tag).returncode != 0:
            git("tag", tag, option("--target"))
        kept = Path(os.environ["FAKE_GH_ASSETS"]) / tag
        kept.mkdir(parents=True)
        shutil.copy(asset, kept / asset.name)
        notes = Path(option("--notes-file")).read_text()
        state["releases"].append(
            {"tagName": tag, "isDraft": False, "assets": {asset.name: str(kept / asset.name)}, "notes": notes}
        )
        state_path.write_text(json.dumps(state))
        return 0
    print("fake gh: unexpected call: " + " ".join(words), file=sys.stderr)
    return 2


sys.exit(main())
"""


class GitHub:
    """A git repository with a line of commits, releases kept beside it, and a `gh` that serves them."""

    def __init__(self, root: Path):
        self.root = root
        self.repo = root / "repo"
        self.repo.mkdir()
        self.state = root / "releases.json"
        self.state.write_text(json.dumps({"releases": []}))
        self.assets = root / "assets"
        self.assets.mkdir()
        tools = root / "bin"
        tools.mkdir()
        gh = tools / "gh"
        gh.write_text(f"#!{sys.executable}\n" + textwrap.dedent(FAKE_GH))
        gh.chmod(0o755)
        self.output = root / "github_output"
        self.temp = root / "runner-temp"  # the runner's temporary folder, outside the checkout
        self.temp.mkdir()
        self.env = {
            **os.environ,
            "PATH": f"{tools}{os.pathsep}{os.environ['PATH']}",
            "FAKE_GH_STATE": str(self.state),
            "FAKE_GH_REPO": str(self.repo),
            "FAKE_GH_ASSETS": str(self.assets),
            "GITHUB_REPOSITORY": "example/wine",
            "GITHUB_OUTPUT": str(self.output),
            "RUNNER_TEMP": str(self.temp),
            "WINE_ASSETS": str(BIN / "wine-assets"),
            "WINE_ASSETS_PARAMS": str(self.repo / "params.yaml"),
            "RUN_ID": "42",
            "GIT_AUTHOR_NAME": "ci",
            "GIT_AUTHOR_EMAIL": "ci@example.invalid",
            "GIT_COMMITTER_NAME": "ci",
            "GIT_COMMITTER_EMAIL": "ci@example.invalid",
        }
        self.git("init", "-q", "-b", "main")
        (self.repo / "params.yaml").write_text("paths: {artifacts_dir: artifacts, registry_dir: registry}\n")
        # Only the registry is made in the checkout: whatever else a script writes there shows in
        # `git status` (see checkout_is_clean).
        (self.repo / ".gitignore").write_text("registry/\n")

    def git(self, *args: str) -> str:
        done = subprocess.run(
            ["git", *args], cwd=self.repo, env=self.env, capture_output=True, text=True, timeout=60, check=True
        )
        return done.stdout.strip()

    def commit(self, message: str) -> str:
        (self.repo / "history.txt").open("a").write(message + "\n")
        self.git("add", "-A")
        self.git("commit", "-q", "-m", message)
        return self.git("rev-parse", "HEAD")

    def release(self, number: int, commit: str, *, bundle: bool = True, draft: bool = False) -> None:
        """A release as an earlier deployment made it: tag at commit, the bundle of v<number> attached."""
        assets = {}
        if bundle:
            source = ModelRegistry(self.root / f"made-v{number}")
            if number > 1:
                source.reserve(number - 1)
            published = source.publish(
                tiny_model_files(f"model {number}"),
                {"metrics": {"accuracy": 0.95}, "git_commit": commit},
            )
            assert published.version == number
            archive = self.assets / f"wine-classifier-v{number}.tar.gz"
            source.export(number, archive)
            assets[archive.name] = str(archive)
        if not draft:
            self.git("tag", f"model-v{number}", commit)
        releases = json.loads(self.state.read_text())
        releases["releases"].append({"tagName": f"model-v{number}", "isDraft": draft, "assets": assets})
        self.state.write_text(json.dumps(releases))

    def releases(self) -> dict[str, dict]:
        return {release["tagName"]: release for release in json.loads(self.state.read_text())["releases"]}

    def run(self, script: str, head: str) -> subprocess.CompletedProcess:
        self.output.write_text("")
        return subprocess.run(
            ["bash", str(SCRIPTS / script)],
            cwd=self.repo,
            env={**self.env, "HEAD_SHA": head},
            capture_output=True,
            text=True,
            timeout=120,
        )

    def run_step(self, name: str, head: str, until: str | None = None) -> subprocess.CompletedProcess:
        """A `run:` step of the deployment workflow, as bash runs it there (up to ``until``)."""
        steps = yaml.safe_load(DEPLOYMENT.read_text())["jobs"]["release"]["steps"]
        script = next(step for step in steps if step.get("name") == name)["run"]
        if until is not None:
            script = script.split(until)[0]
        return subprocess.run(
            ["bash", "-e", "-o", "pipefail", "-c", script],
            cwd=self.repo,
            env={**self.env, "HEAD_SHA": head},
            capture_output=True,
            text=True,
            timeout=60,
        )

    def checkout_is_clean(self) -> bool:
        return self.git("status", "--porcelain", "--untracked-files=all") == ""

    def decision(self) -> str | None:
        lines = [line for line in self.output.read_text().splitlines() if line.startswith("deploy=")]
        return lines[-1].split("=", 1)[1] if lines else None

    @property
    def registry(self) -> ModelRegistry:
        return ModelRegistry(self.repo / "registry")


@pytest.fixture
def github(tmp_path):
    require_programs("jq", "git")
    return GitHub(tmp_path)


def test_the_first_deployment_restores_nothing_and_deploys(github):
    head = github.commit("first")
    done = github.run("restore-production.sh", head)
    assert done.returncode == 0, done.stderr
    assert "no model released yet: this release will be v1" in done.stdout
    assert github.decision() == "true"
    assert github.registry.versions() == []


def test_production_is_the_highest_release_with_a_bundle_and_numbers_skip_every_taken_one(github):
    first = github.commit("first")
    github.release(1, first)
    second = github.commit("second")
    github.release(2, second, bundle=False)  # made by hand, without the bundle
    github.release(3, second, draft=True)  # a draft holds no tag and is not a release yet
    github.git("tag", "model-v4", second)  # a tag whose release failed half-way
    head = github.commit("third")

    done = github.run("restore-production.sh", head)
    assert done.returncode == 0, done.stderr
    assert "::warning::release model-v2 has no bundle (.tar.gz): skipped" in done.stdout
    assert "::warning::tag model-v4 has no release" in done.stdout
    assert "model-v3" not in done.stdout
    assert github.decision() == "true"
    assert github.registry.versions() == [1] and github.registry.production_version() == 1
    assert github.registry.reserved_through() == 4  # so the release becomes v5, never a taken tag


def test_a_rerun_of_an_old_pipeline_run_is_not_deployed(github):
    old = github.commit("old")
    github.git("checkout", "-q", "-b", "side")
    side = github.commit("a commit that production does not contain")
    github.git("checkout", "-q", "main")
    newer = github.commit("newer")
    github.release(1, newer)

    for head in (old, side):
        done = github.run("restore-production.sh", head)
        assert done.returncode == 0, done.stderr
        assert f"::notice::skipped: {head} does not descend from {newer}" in done.stdout
        assert github.decision() == "false"
    assert github.run("restore-production.sh", newer).returncode == 0 and github.decision() == "true"


def test_a_failing_release_listing_stops_the_restore_without_a_decision(github):
    github.release(1, github.commit("first"))
    github.env["FAKE_GH_FAIL"] = "release list"
    done = github.run("restore-production.sh", github.commit("second"))
    assert done.returncode != 0 and "Bad Gateway" in done.stderr
    assert github.decision() is None  # never "no model released yet", never deploy=true
    assert github.registry.versions() == []


def test_a_production_commit_missing_from_history_stops_the_deployment(github):
    github.commit("first")
    github.release(1, "0" * 40)
    done = github.run("restore-production.sh", github.git("rev-parse", "HEAD"))
    assert done.returncode == 1
    assert "was released from commit '" + "0" * 40 + "', which is not in this history" in done.stdout
    assert github.decision() is None


def test_publish_creates_the_tag_with_the_release_at_the_deployed_commit(github):
    first = github.commit("first")
    github.release(1, first)
    github.git("tag", "model-v2", first)  # left by a failed attempt
    head = github.commit("second")
    assert github.run("restore-production.sh", head).returncode == 0
    github.registry.publish(  # what `make release` does, with the model that run evaluated
        tiny_model_files("new model"),
        {"metrics": {"accuracy": 0.97}, "git_commit": head},
    )
    assert github.registry.production_version() == 3

    done = github.run("publish-release.sh", head)
    assert done.returncode == 0, done.stderr
    release = github.releases()["model-v3"]
    assert list(release["assets"]) == ["wine-classifier-v3.tar.gz"]
    assert f"Released from {head} by ml-pipeline run 42." in release["notes"]
    assert github.git("rev-parse", "model-v3^{commit}") == head

    again = github.run("publish-release.sh", head)  # e.g. the job re-run after a later step failed
    assert again.returncode == 0, again.stderr
    assert "model-v3 is already released with these model bytes: nothing new" in again.stdout
    assert len(github.releases()) == 2
    # Downloads, the exported bundle and the notes were all written outside the checkout.
    assert github.checkout_is_clean()
    assert (github.temp / "restore" / "wine-classifier-v1.tar.gz").is_file()
    assert (github.temp / "publish" / "released" / "wine-classifier-v3.tar.gz").is_file()


def test_the_scripts_refuse_to_run_without_a_folder_outside_the_checkout(github):
    head = github.commit("first")
    del github.env["RUNNER_TEMP"]
    for script in ("restore-production.sh", "publish-release.sh"):
        done = github.run(script, head)
        assert done.returncode != 0 and "RUNNER_TEMP must name a folder outside the checkout" in done.stderr
    assert github.decision() is None and github.checkout_is_clean()


def test_only_a_commit_of_the_main_branch_passes_the_first_check(github):
    """The workflow's own step: refs/remotes/origin/main is where the checkout keeps the branch."""
    first = github.commit("first")
    on_main = github.commit("second")
    github.git("update-ref", "refs/remotes/origin/main", on_main)
    name = "Check the commit is on the main branch"
    for head in (first, on_main):
        done = github.run_step(name, head)
        assert done.returncode == 0, done.stdout + done.stderr
        assert f"{head} is on the main branch (at {on_main})" in done.stdout
    # A tag named main at a commit that is not on the branch: the name matches, the commit does not.
    github.git("checkout", "-q", "-b", "elsewhere")
    elsewhere = github.commit("pushed as the tag main")
    github.git("tag", "main", elsewhere)
    github.git("checkout", "-q", "main")
    done = github.run_step(name, elsewhere)
    assert done.returncode == 1
    assert f"::error::{elsewhere} is not a commit of the main branch (at {on_main}): not deployed" in done.stdout
    github.git("update-ref", "-d", "refs/remotes/origin/main")
    done = github.run_step(name, on_main)  # the tag named main is never taken for the branch
    assert done.returncode == 1 and "::error::the main branch was not fetched" in done.stdout


def test_the_lock_is_compared_with_the_one_the_pipeline_recorded(github):
    """The install step's check, before `make install`: uv.lock's own hash, not whatever the file lists."""
    head = github.commit("first")
    (github.repo / "uv.lock").write_text("the lock\n")
    recorded = github.temp / "pipeline-artifacts" / "logs" / "uv.lock.sha256"
    recorded.parent.mkdir(parents=True)
    github.env["PIPELINE_ARTIFACTS"] = str(github.temp / "pipeline-artifacts")
    name, until = "Install from the lock the pipeline run used", "make install"
    recorded.write_text(_sha256sum(github, "uv.lock"))
    same = github.run_step(name, head, until)
    assert same.returncode == 0, same.stderr
    recorded.write_text(_sha256sum(github, ".gitignore"))  # `sha256sum --check` would pass this one
    assert github.run_step(name, head, until).returncode != 0
    recorded.write_text(_sha256sum(github, "uv.lock"))
    (github.repo / "uv.lock").write_text("another lock\n")  # this checkout's lock is not the recorded one
    assert github.run_step(name, head, until).returncode != 0


def _sha256sum(github: GitHub, name: str) -> str:
    done = subprocess.run(["sha256sum", name], cwd=github.repo, capture_output=True, text=True, check=True)
    return done.stdout


def test_publish_refuses_a_taken_tag_and_a_release_with_other_bytes(github):
    first = github.commit("first")
    head = github.commit("second")
    github.registry.publish(tiny_model_files("m"), {"git_commit": head})
    github.git("tag", "model-v1", first)  # appeared after the numbering was decided
    refused = github.run("publish-release.sh", head)
    assert refused.returncode == 1
    assert f"::error::tag model-v1 exists at {first}, not at {head}" in refused.stdout
    assert github.releases() == {}

    github.git("tag", "-d", "model-v1")
    github.release(1, first)  # a model-v1 with other bytes
    different = github.run("publish-release.sh", head)
    assert different.returncode != 0
    assert "already holds a different v1" in different.stderr
