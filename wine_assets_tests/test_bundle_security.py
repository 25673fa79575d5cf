"""Bundles that cannot run code: skops instead of pickles, signed manifests, plain file names, no
links followed. Each test is an attack that was tried for real; each shows it refused with a
clear error and nothing lost (README "Security")."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import skops.io
from sklearn.datasets import load_wine
from sklearn.ensemble import ExtraTreesClassifier, GradientBoostingClassifier, RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import FunctionTransformer, StandardScaler
from sklearn.tree import DecisionTreeClassifier

from wine_assets import model_format, signing
from wine_assets.params import ServingParams
from wine_assets.registry import (
    MODEL_FILE,
    ChecksumError,
    InvalidVersion,
    ModelRegistry,
    RegistryError,
    UntrustedBundle,
    parse_version,
)
from wine_assets.serving.state import ServingState

from .support import tiny_model_files, tree_snapshot

FIELDS = {"metrics": {"accuracy": 0.9}}


class RunsACommand:
    """A pickle that, when loaded, creates a marker file (the attacker's command) and returns a
    harmless object, so a loader that unpickles it would seem to work."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.fixture
def registry(tmp_path: Path) -> ModelRegistry:
    registry = ModelRegistry(tmp_path / "registry")
    registry.publish(tiny_model_files("v1"), FIELDS)
    return registry


def rehash(folder: Path) -> None:
    """What the attack did after swapping a file: every sha256 and size in the manifest recomputed."""
    manifest_path = folder / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    for name, entry in manifest["files"].items():
        content = (folder / name).read_bytes()
        entry["sha256"], entry["bytes"] = hashlib.sha256(content).hexdigest(), len(content)
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")


def sign_with(folder: Path, key) -> None:
    (folder / signing.SIGNATURE_FILE).write_bytes(signing.sign((folder / "manifest.json").read_bytes(), key))


def other_key():
    return signing.private_key_from_pem(signing.new_private_key_pem(), "a second key")


# -- the format: skops, trusted types only -------------------------------------------------------
@pytest.mark.unit
def test_every_family_round_trips_bit_identical_on_100000_rows():
    features, target = load_wine(return_X_y=True)
    rows = np.random.default_rng(7).normal(features.mean(0), features.std(0), size=(100_000, features.shape[1]))
    for model in (
        RandomForestClassifier(n_estimators=20, random_state=0),
        ExtraTreesClassifier(n_estimators=20, random_state=0),
        GradientBoostingClassifier(n_estimators=10, random_state=0),
        LogisticRegression(max_iter=5000),
        DecisionTreeClassifier(random_state=0),
    ):
        scaler = StandardScaler().fit(features)
        model.fit(scaler.transform(features), target)
        loaded = model_format.loads(model_format.dumps(model), "model", "model.skops")
        loaded_scaler = model_format.loads(model_format.dumps(scaler), "scaler", "scaler.skops")
        assert np.array_equal(loaded_scaler.transform(rows), scaler.transform(rows))
        scaled = scaler.transform(rows)
        assert np.array_equal(loaded.predict_proba(scaled), model.predict_proba(scaled)), type(model).__name__


@pytest.mark.integration
def test_the_same_fitted_model_gives_the_same_bytes_in_another_process():
    """The registry is content-addressed: a retrained, identical model must be the same file."""
    script = (
        "import hashlib, sys\n"
        "from sklearn.datasets import load_wine\n"
        "from sklearn.ensemble import RandomForestClassifier\n"
        "from wine_assets import model_format\n"
        "x, y = load_wine(return_X_y=True)\n"
        "model = RandomForestClassifier(n_estimators=5, random_state=3).fit(x, y)\n"
        "print(hashlib.sha256(model_format.dumps(model)).hexdigest())\n"
    )
    here = hashlib.sha256(
        model_format.dumps(RandomForestClassifier(n_estimators=5, random_state=3).fit(*load_wine(return_X_y=True)))
    ).hexdigest()
    there = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True)
    assert there.stdout.strip() == here


@pytest.mark.unit
def test_a_pickle_an_untrusted_type_and_the_wrong_estimator_are_refused(tmp_path):
    marker = tmp_path / "code-ran"
    with pytest.raises(model_format.ModelFormatError, match="not a skops file .a pickle, which runs code"):
        model_format.loads(pickle.dumps(RunsACommand(marker)), "model", "v9/model.skops")
    calls_a_function = skops.io.dumps(FunctionTransformer(func=os.system))
    with pytest.raises(
        model_format.ModelFormatError, match="v9/model.skops holds types that are not trusted: .*system"
    ):
        model_format.loads(calls_a_function, "model", "v9/model.skops")
    scaler = model_format.dumps(StandardScaler().fit([[0.0], [1.0]]))
    with pytest.raises(
        model_format.ModelFormatError, match="holds a sklearn.preprocessing._data.StandardScaler, not a model"
    ):
        model_format.loads(scaler, "model", "v9/model.skops")
    with pytest.raises(model_format.ModelFormatError, match="not a readable skops file"):
        model_format.loads(scaler[:200] + b"\0" * 50 + scaler[250:], "scaler", "v9/scaler.skops")
    assert not marker.exists()


# -- the attack: a re-hashed bundle ---------------------------------------------------------------
@pytest.mark.component
def test_a_rehashed_bundle_with_a_pickle_runs_no_code_anywhere(registry, tmp_path, wine_assets_cli, monkeypatch):
    marker = tmp_path / "code-ran"
    folder = registry.version_dir(1)
    (folder / MODEL_FILE).write_bytes(pickle.dumps(RunsACommand(marker)))
    rehash(folder)
    before = tree_snapshot(registry.root)

    with pytest.raises(UntrustedBundle, match="does not match manifest.json: the bundle was changed after signing"):
        registry.load(1)
    shown = wine_assets_cli("registry", "--registry", registry.root, "show", "1")
    assert shown.returncode == 1 and "the bundle was changed after signing" in shown.stderr
    other = tmp_path / "other"
    imported = wine_assets_cli("registry", "--registry", other, "import", folder, "--production")
    assert imported.returncode == 1 and "the bundle was changed after signing" in imported.stderr
    assert not (other / "wine-classifier").exists()
    state = ServingState(registry.root, ServingParams(reload_interval_seconds=0.1), retry_seconds=60)
    state.poll_once()
    assert state.production is None and "changed after signing" in state.last_failure.message

    # Even signed by a trusted key (a stolen key, or a careless insider), the pickle is refused unread.
    signature = (folder / signing.SIGNATURE_FILE).read_bytes()
    sign_with(folder, signing.signing_key())
    with pytest.raises(UntrustedBundle, match="is not a skops file .a pickle, which runs code when loaded: refused"):
        registry.load(1)
    predicted = wine_assets_cli("predict", "-", "--registry", registry.root, stdin="alcohol\n13.2\n")
    assert predicted.returncode != 0 and "a pickle" in predicted.stderr
    imported = wine_assets_cli("registry", "--registry", other, "import", folder, "--production")
    assert imported.returncode == 1 and "a pickle, which runs code" in imported.stderr
    assert not marker.exists()
    (folder / signing.SIGNATURE_FILE).write_bytes(signature)  # as the attack left it, to compare
    assert tree_snapshot(registry.root) == before


@pytest.mark.component
def test_unsigned_and_untrusted_bundles_are_refused_until_their_key_is_trusted(registry, tmp_path, monkeypatch):
    folder = registry.version_dir(1)
    signature = folder / signing.SIGNATURE_FILE
    original = signature.read_bytes()
    other = ModelRegistry(tmp_path / "other")

    signature.unlink()
    with pytest.raises(UntrustedBundle, match="has no manifest.sig: an unsigned bundle is refused"):
        other.import_dir(folder)
    stranger = other_key()
    sign_with(folder, stranger)
    stranger_id = signing.key_id(signing.public_key_text(stranger))
    with pytest.raises(UntrustedBundle, match=f"signed by key {stranger_id}, which is not trusted here"):
        other.import_dir(folder)
    signature.write_bytes(b'{"algorithm": "rsa", "key_id": "x", "signature": ""}')
    with pytest.raises(UntrustedBundle, match="uses 'rsa', not ed25519"):
        other.import_dir(folder)
    assert not other.model_dir.exists()

    sign_with(folder, stranger)
    monkeypatch.setenv(signing.TRUSTED_KEYS_ENV, signing.public_key_text(stranger))
    assert ModelRegistry(tmp_path / "other").import_dir(folder) == (1, True)
    monkeypatch.delenv(signing.TRUSTED_KEYS_ENV)
    trusted_in_params = signing.Trust.from_config([signing.public_key_text(stranger)])
    assert ModelRegistry(tmp_path / "third", trust=trusted_in_params).import_dir(folder) == (1, True)
    signature.write_bytes(original)


@pytest.mark.component
def test_a_new_key_is_owner_only_never_overwritten_and_its_public_half_printed(tmp_path, wine_assets_cli, monkeypatch):
    key_file = tmp_path / "keys" / "release.pem"
    made = wine_assets_cli("keys", "new", "--output", key_file)
    assert made.returncode == 0, made.stderr
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    public = next(word for word in made.stdout.split() if word.startswith("ed25519:"))
    again = wine_assets_cli("keys", "new", "--output", key_file)
    assert again.returncode == 2 and "refusing to replace a signing key" in again.stderr
    monkeypatch.setenv(signing.SIGNING_KEY_FILE_ENV, str(key_file))
    shown = wine_assets_cli("keys", "public")
    assert shown.returncode == 0 and shown.stdout.split()[0] == public
    key_file.write_text("not a key\n")
    broken = wine_assets_cli("keys", "public")
    assert broken.returncode == 2 and f"{key_file} is not an unencrypted PEM private key" in broken.stderr


@pytest.mark.component
def test_the_first_publish_without_a_key_makes_one_and_trusts_it(tmp_path, monkeypatch, caplog):
    monkeypatch.delenv(signing.SIGNING_KEY_FILE_ENV)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    registry = ModelRegistry(tmp_path / "registry")
    registry.publish(tiny_model_files("a"), FIELDS)
    key_file = tmp_path / "config" / "wine-assets" / "signing-key.pem"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert f"created the signing key {key_file}" in caplog.text
    assert ModelRegistry(tmp_path / "registry").load().version == 1  # a reader on this machine trusts it


@pytest.mark.component
def test_rotation_signs_old_versions_with_the_new_key_and_never_launders_an_untrusted_one(
    registry, tmp_path, wine_assets_cli, monkeypatch
):
    old_public = signing.public_key_text(signing.signing_key())
    new_file = tmp_path / "new.pem"
    signing.write_private_key(new_file, signing.new_private_key_pem())
    monkeypatch.setenv(signing.SIGNING_KEY_FILE_ENV, str(new_file))
    monkeypatch.setenv(signing.TRUSTED_KEYS_ENV, old_public)  # both trusted while rotating
    signed = wine_assets_cli("registry", "--registry", registry.root, "sign")
    assert signed.returncode == 0, signed.stderr
    new_id = signing.key_id(signing.public_key_text(signing.signing_key()))
    assert f"v1: signed by key {new_id} (was {signing.key_id(old_public)})" in signed.stdout
    assert registry.history()[-1] == {**registry.history()[-1], "action": "sign", "version": 1, "to_key": new_id}
    monkeypatch.delenv(signing.TRUSTED_KEYS_ENV)  # the old key retired
    assert ModelRegistry(registry.root).load(1).version == 1

    sign_with(registry.version_dir(1), other_key())  # a bundle no trusted key signed
    before = tree_snapshot(registry.root)
    refused = wine_assets_cli("registry", "--registry", registry.root, "sign", "1")
    assert refused.returncode == 1 and "which is not trusted here" in refused.stderr
    assert tree_snapshot(registry.root) == before


# -- names, links and sizes --------------------------------------------------------------------
@pytest.mark.component
@pytest.mark.parametrize("name", ["../../../escaped", "/dev/zero", "notes.txt"])
def test_a_manifest_naming_anything_but_the_bundle_files_is_refused(registry, tmp_path, name):
    """Signed by the trusted key, even: only the bundle's plain file names are ever read or written."""
    folder = tmp_path / "bundle"
    folder.mkdir()
    for entry in registry.version_dir(1).iterdir():
        (folder / entry.name).write_bytes(entry.read_bytes())
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"][name] = {"sha256": "0" * 64, "bytes": 10}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    sign_with(folder, signing.signing_key())
    other = ModelRegistry(tmp_path / "other" / "deep" / "registry")
    with pytest.raises(UntrustedBundle, match="a bundle holds only model.skops, scaler.skops"):
        other.import_dir(folder)
    assert not (tmp_path / "other" / "escaped").exists() and not other.model_dir.exists()


@pytest.mark.component
def test_a_bundle_file_that_is_a_link_or_larger_than_listed_is_never_read(registry, tmp_path):
    folder = registry.version_dir(1)
    model = folder / MODEL_FILE
    kept = model.read_bytes()
    model.unlink()
    model.symlink_to("/dev/zero")
    with pytest.raises(ChecksumError, match="model.skops is a symbolic link, which is never followed"):
        registry.load(1)
    model.unlink()
    model.write_bytes(kept + b"\0" * 4096)
    with pytest.raises(ChecksumError, match="model.skops is larger than"):
        registry.load(1)
    model.write_bytes(kept)
    assert registry.load(1).version == 1


@pytest.mark.component
def test_a_staging_folder_that_is_a_link_deletes_nothing(registry, tmp_path):
    victim = tmp_path / "victim"
    (victim / "keep" / "deeper").mkdir(parents=True)
    (victim / "keep" / "deeper" / "data.txt").write_text("precious\n")
    registry.staging_dir.rmdir()
    registry.staging_dir.symlink_to(victim, target_is_directory=True)
    before = tree_snapshot(victim)
    with pytest.raises(RegistryError, match=r"\.staging is a symbolic link; the registry never follows links"):
        registry.publish(tiny_model_files("v2"), FIELDS)
    assert tree_snapshot(victim) == before and registry.versions() == [1]

    registry.staging_dir.unlink()  # a leftover entry that is a link: the link goes, its target stays
    registry.staging_dir.mkdir()
    (registry.staging_dir / "v2-leftover").symlink_to(victim / "keep", target_is_directory=True)
    registry.publish(tiny_model_files("v2"), FIELDS)
    assert tree_snapshot(victim) == before and registry.versions() == [1, 2]


@pytest.mark.component
def test_an_alias_that_is_a_link_is_refused_without_echoing_its_target(registry, tmp_path, wine_assets_cli):
    secret = tmp_path / "secret.txt"
    secret.write_text("v1 hunter2-password\n")
    registry.alias_path.unlink()
    registry.alias_path.symlink_to(secret)
    with pytest.raises(RegistryError, match="links are never followed") as error:
        registry.production_version()
    assert "hunter2" not in str(error.value)
    shown = wine_assets_cli("registry", "--registry", registry.root, "show")
    assert shown.returncode == 1 and "hunter2" not in shown.stderr + shown.stdout
    state = ServingState(registry.root, ServingParams(reload_interval_seconds=0.1), retry_seconds=60)
    state.poll_once()
    assert state.production is None and "hunter2" not in state.last_failure.message


@pytest.mark.component
def test_a_five_thousand_digit_version_is_bad_input_not_a_crash(registry, wine_assets_cli):
    digits = "9" * 5000
    with pytest.raises(InvalidVersion, match="at most 9 digits") as error:
        parse_version(digits)
    assert len(str(error.value)) < 120
    shown = wine_assets_cli("registry", "--registry", registry.root, "show", digits)
    assert shown.returncode == 2 and "at most 9 digits" in shown.stderr and "Traceback" not in shown.stderr


@pytest.mark.component
def test_a_malformed_trusted_key_is_one_message_before_serve_or_a_registry_command(
    tmp_path, wine_assets_cli, monkeypatch
):
    monkeypatch.setenv(signing.TRUSTED_KEYS_ENV, "ed25519:not-a-key")
    for command in (["serve", "--port", "1"], ["registry", "--registry", tmp_path / "registry", "list"]):
        refused = wine_assets_cli(*command)
        assert refused.returncode == 2, (command, refused.stderr)
        assert "$WINE_ASSETS_TRUSTED_KEYS: 'ed25519:not-a-key' is not a public key" in refused.stderr
        assert "Traceback" not in refused.stderr
