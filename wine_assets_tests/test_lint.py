"""Static checks that run in the test suite: ruff on the code, zizmor on the workflows, shellcheck
on the shell scripts. Each is a dev dependency in uv.lock, so every machine runs the same version.
"""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .support import REPO_ROOT

BIN = Path(sys.executable).parent
pytestmark = pytest.mark.integration
SHELL_SCRIPTS = [*sorted((REPO_ROOT / ".github" / "scripts").glob("*.sh")), REPO_ROOT / ".ci" / "run"]


def tool(name, *args, cwd=REPO_ROOT):
    return subprocess.run([str(BIN / name), *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_ruff_finds_nothing():
    checked = tool("ruff", "check", "wine_assets", "wine_assets_tests", "benchmarks")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    formatted = tool("ruff", "format", "--check", "wine_assets", "wine_assets_tests", "benchmarks")
    assert formatted.returncode == 0, formatted.stdout + formatted.stderr


def zizmor(folder):
    return tool("zizmor", "--offline", "--config", str(REPO_ROOT / ".github" / "zizmor.yml"), str(folder))


def test_zizmor_finds_nothing_in_the_workflows():
    audited = zizmor(REPO_ROOT / ".github" / "workflows")
    assert audited.returncode == 0, audited.stdout + audited.stderr
    assert "No findings to report" in audited.stdout


def test_zizmor_rejects_a_checkout_that_leaves_the_token_behind(tmp_path):
    """The shape the workflows had before: checkout's default persists the token in .git/config,
    where the build, the tests and the uploaded artifacts can reach it."""
    folder = tmp_path / ".github" / "workflows"
    folder.mkdir(parents=True)
    for path in (REPO_ROOT / ".github" / "workflows").glob("*.yml"):
        text = path.read_text()
        assert "persist-credentials: false" in text
        # checkout's default, as before: the input left out (`clean` keeps each `with:` non-empty)
        (folder / path.name).write_text(re.sub(r"persist-credentials: false.*", "clean: true", text))
    audited = zizmor(folder)
    assert audited.returncode != 0
    assert audited.stdout.count("artipacked") >= 3  # every checkout: two in ml-pipeline, one in the deployment


def test_shellcheck_finds_nothing_in_the_shell_scripts():
    assert len(SHELL_SCRIPTS) == 3 and all(path.is_file() for path in SHELL_SCRIPTS)
    checked = tool("shellcheck", *map(str, SHELL_SCRIPTS))
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_shellcheck_is_live(tmp_path):
    broken = tmp_path / "broken.sh"
    broken.write_text("#!/usr/bin/env bash\nfor f in $(ls *.csv); do echo $f; done\n")
    checked = tool("shellcheck", str(broken))
    assert checked.returncode == 1 and "SC2045" in checked.stdout


def test_the_lock_matches_pyproject():
    """uv's own check: fails when a dependency in pyproject.toml changed without `make lock`."""
    uv = shutil.which("uv") or str(REPO_ROOT / ".tools" / "uv" / "bin" / "uv")
    checked = subprocess.run(
        [uv, "lock", "--check", "--offline"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
