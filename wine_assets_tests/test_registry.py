"""The model registry: versions, checksums, the production alias, locking and crash safety."""

import json
import multiprocessing
import os
import pickle
import stat
import subprocess
import sys
import textwrap

import pytest

from wine_assets.registry import (
    ChecksumError,
    InvalidVersion,
    ModelRegistry,
    NoProductionModel,
    RegistryError,
    UntrustedBundle,
    VersionNotFound,
    extract_bundle,
    parse_version,
)

from .support import tiny_model_files, tree_snapshot


def bundle(tag: str) -> dict[str, bytes]:
    return {**tiny_model_files(tag), "metrics.json": json.dumps({"accuracy": 0.9}).encode()}


def tag_of(loaded) -> float:
    """What tiny_model_files made of a tag: its scaler's mean is half the tag's code points."""
    return float(loaded.scaler.mean_[0])


def mean_of(tag: str) -> float:
    return sum(map(ord, tag)) / 2


FIELDS = {"metrics": {"accuracy": 0.9}, "data_fingerprint": "f" * 64}


@pytest.fixture
def registry(tmp_path):
    return ModelRegistry(tmp_path / "registry")


@pytest.mark.unit
def test_publish_writes_a_checksummed_version_and_moves_production(registry):
    result = registry.publish(bundle("a"), FIELDS)
    assert (result.version, result.created, result.previous_production, result.production) == (1, True, None, 1)
    assert registry.alias_path.read_text() == "v1\n"
    manifest = json.loads((registry.version_dir(1) / "manifest.json").read_text())
    assert manifest["version"] == 1 and manifest["tag"] == "model-v1"
    assert manifest["data_fingerprint"] == "f" * 64
    assert set(manifest["files"]) == {"model.skops", "scaler.skops", "metrics.json"}
    loaded = registry.load()
    assert loaded.version == 1 and loaded.scaler.mean_[0] == ord("a") / 2 and loaded.model.predict([[ord("a")]]) == [1]
    assert list(registry.staging_dir.iterdir()) == []


@pytest.mark.unit
def test_versions_count_up_and_production_follows(registry):
    registry.publish(bundle("a"), FIELDS)
    second = registry.publish(bundle("b"), FIELDS)
    assert (second.version, second.previous_production) == (2, 1)
    assert registry.versions() == [1, 2]
    assert registry.production_version() == 2
    assert tag_of(registry.load(1)) == mean_of("a")


@pytest.mark.unit
def test_same_bytes_make_no_new_version_but_move_production_back(registry):
    registry.publish(bundle("a"), FIELDS)
    registry.publish(bundle("b"), FIELDS)
    again = registry.publish(bundle("a"), FIELDS)
    assert (again.version, again.created, again.production) == (1, False, 1)
    assert registry.versions() == [1, 2]
    assert registry.production_version() == 1


@pytest.mark.unit
def test_a_failing_check_discards_the_bundle_and_leaves_the_registry_as_it_was(registry):
    registry.publish(bundle("a"), FIELDS)
    before = tree_snapshot(registry.root)
    seen = []

    def refuse(loaded):
        seen.append(tag_of(loaded))
        raise RuntimeError("scores differ")

    with pytest.raises(RuntimeError, match="scores differ"):
        registry.publish(bundle("b"), FIELDS, check=refuse)
    assert seen == [mean_of("b")]  # the check saw the bundle as loaded back from disk
    assert tree_snapshot(registry.root) == before
    assert registry.versions() == [1] and registry.production_version() == 1


@pytest.mark.unit
def test_tampered_file_is_refused_before_it_is_unpickled(registry, tmp_path):
    registry.publish(bundle("a"), FIELDS)
    registry.publish(bundle("b"), FIELDS)
    marker = tmp_path / "code-ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (registry.version_dir(1) / "model.skops").write_bytes(pickle.dumps(Payload()))
    before = tree_snapshot(registry.root)
    with pytest.raises(ChecksumError, match=r"model\.skops does not match its sha256"):
        registry.load(1)
    with pytest.raises(ChecksumError):
        registry.set_production(1)
    assert not marker.exists()
    assert registry.production_version() == 2
    assert tree_snapshot(registry.root) == before


@pytest.mark.unit
def test_rollback_moves_production_after_verifying(registry):
    registry.publish(bundle("a"), FIELDS)
    registry.publish(bundle("b"), FIELDS)
    assert registry.set_production("v1") == (2, 1)
    assert registry.production_version() == 1
    assert registry.set_production(1) == (1, 1)


@pytest.mark.unit
def test_missing_versions_and_empty_registry_have_clear_errors(registry):
    with pytest.raises(NoProductionModel, match="run the release job"):
        registry.load()
    assert registry.production_manifest() is None
    registry.publish(bundle("a"), FIELDS)
    with pytest.raises(VersionNotFound, match=r"version v9 is not in .*published versions: v1"):
        registry.load(9)
    with pytest.raises(VersionNotFound):
        registry.set_production(9)


@pytest.mark.unit
@pytest.mark.parametrize("text", ["x", "v", "v0", "0", "-1", "1.5"])
def test_parse_version_refuses_non_versions(text):
    with pytest.raises(InvalidVersion):
        parse_version(text)


@pytest.mark.unit
def test_parse_version_accepts_numbers_and_v_prefix():
    assert parse_version("3") == parse_version("v3") == parse_version(3) == 3


def _publish_in_process(root: str, tag: str, queue) -> None:
    result = ModelRegistry(root).publish(bundle(tag), FIELDS)
    queue.put(result.version)


@pytest.mark.integration
def test_concurrent_releases_never_share_a_version(registry):
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    workers = [context.Process(target=_publish_in_process, args=(str(registry.root), f"m{i}", queue)) for i in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
        assert worker.exitcode == 0
    versions = sorted(queue.get(timeout=5) for _ in workers)
    assert versions == [1, 2, 3, 4]
    assert registry.versions() == [1, 2, 3, 4]
    for version in versions:
        registry.verify(version)


CRASH_SCRIPT = textwrap.dedent(
    """
    import json, os, pathlib, sys
    from wine_assets.registry import ModelRegistry

    root, where, made = sys.argv[1], sys.argv[2], pathlib.Path(sys.argv[3])
    registry = ModelRegistry(root)
    files = {path.name: path.read_bytes() for path in made.iterdir()}

    def die(*args, **kwargs):
        os._exit(137)

    if where == "before_rename":
        registry.publish(files, {}, check=die)       # every file written and fsynced, nothing renamed
    else:
        ModelRegistry._write_alias = die             # the version renamed in, the alias not yet moved
        registry.publish(files, {})
    """
)


def _crash(registry, where):
    made = registry.root.parent / "made"
    made.mkdir()
    for name, content in tiny_model_files("b").items():
        (made / name).write_bytes(content)
    command = [sys.executable, "-c", CRASH_SCRIPT, str(registry.root), where, str(made)]
    completed = subprocess.run(command, timeout=120)
    assert completed.returncode == 137


@pytest.mark.integration
def test_crash_before_the_version_is_visible_leaves_the_model_tree_byte_for_byte(registry):
    registry.publish(bundle("a"), FIELDS)
    before = tree_snapshot(registry.model_dir)
    _crash(registry, "before_rename")
    assert tree_snapshot(registry.model_dir) == before
    assert len(list(registry.staging_dir.iterdir())) == 1  # the dead publisher's half-made bundle
    assert registry.versions() == [1] and registry.production_version() == 1
    registry.publish(bundle("c"), FIELDS)
    assert list(registry.staging_dir.iterdir()) == []  # swept by the next publisher
    assert registry.versions() == [1, 2]


@pytest.mark.integration
def test_crash_before_the_alias_moves_keeps_the_previous_production(registry):
    registry.publish(bundle("a"), FIELDS)
    _crash(registry, "before_alias")
    assert registry.production_version() == 1
    assert tag_of(registry.load()) == mean_of("a")
    assert registry.versions() == [1, 2]
    registry.verify(2)  # whole and checksummed, just not production
    retry = registry.publish(tiny_model_files("b"), {})
    assert (retry.version, retry.created, registry.production_version()) == (2, False, 2)


@pytest.mark.unit
def test_a_damaged_alias_is_an_error_to_readers_and_repaired_by_writers(registry):
    registry.publish(bundle("a"), FIELDS)
    registry.alias_path.write_text("nonsense\n")
    with pytest.raises(RegistryError, match="holds 'nonsense', not a version"):
        registry.load()
    assert registry.set_production(1) == (None, 1)
    assert registry.alias_path.read_text() == "v1\n"
    registry.alias_path.write_text("v7\n")
    with pytest.raises(RegistryError, match="names v7, which is not in the registry") as error:
        registry.load()
    assert not isinstance(error.value, VersionNotFound)  # the user asked for no version: not a bad-input error
    result = registry.publish(bundle("b"), FIELDS)
    assert (result.previous_production, registry.production_version()) == (7, 2)


@pytest.mark.unit
def test_a_damaged_manifest_is_a_checksum_error(registry):
    registry.publish(bundle("a"), FIELDS)
    (registry.version_dir(1) / "manifest.json").write_text("{not json")
    with pytest.raises(ChecksumError, match="is not valid JSON"):
        registry.manifest(1)
    with pytest.raises(UntrustedBundle, match="does not match manifest.json"):
        registry.load(1)


@pytest.mark.unit
def test_files_get_the_usual_permissions(registry):
    registry.publish(bundle("a"), FIELDS)
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(registry.version_dir(1).stat().st_mode) == 0o777 & ~umask
    assert stat.S_IMODE((registry.version_dir(1) / "model.skops").stat().st_mode) == 0o666 & ~umask
    assert stat.S_IMODE(registry.alias_path.stat().st_mode) == 0o666 & ~umask


@pytest.mark.unit
def test_export_and_import_carry_a_version_between_registries(registry, tmp_path):
    registry.publish(bundle("a"), FIELDS)
    registry.publish(bundle("b"), FIELDS)
    archive = tmp_path / "v2.tar.gz"
    assert registry.export(2, archive) == 2
    registry.export(2, tmp_path / "again.tar.gz")
    assert archive.read_bytes() == (tmp_path / "again.tar.gz").read_bytes()  # reproducible archive

    other = ModelRegistry(tmp_path / "other")
    folder = extract_bundle(archive, tmp_path / "unpacked")
    assert other.import_dir(folder, set_production=True) == (2, True)
    assert other.versions() == [2] and other.production_version() == 2
    assert tag_of(other.load()) == mean_of("b")
    assert other.import_dir(folder) == (2, False)
    assert other.publish(bundle("c"), FIELDS).version == 3  # numbering continues after the import

    (folder / "scaler.skops").write_bytes(b"changed")
    with pytest.raises(ChecksumError):
        ModelRegistry(tmp_path / "third").import_dir(folder)
    assert not (tmp_path / "third" / "wine-classifier").exists()


@pytest.mark.unit
def test_import_refuses_a_different_bundle_under_an_existing_number(registry, tmp_path):
    registry.publish(bundle("a"), FIELDS)
    registry.export(1, tmp_path / "a.tar.gz")
    other = ModelRegistry(tmp_path / "other")
    other.publish(bundle("z"), FIELDS)
    with pytest.raises(RegistryError, match="already holds a different v1"):
        other.import_dir(extract_bundle(tmp_path / "a.tar.gz", tmp_path / "x"))


@pytest.mark.unit
def test_extract_refuses_archives_that_are_not_bundles(tmp_path):
    import io
    import tarfile

    evil = tmp_path / "evil.tar.gz"
    with tarfile.open(evil, "w:gz") as archive:
        info = tarfile.TarInfo("../outside.txt")
        info.size = 1
        archive.addfile(info, io.BytesIO(b"x"))
    with pytest.raises(RegistryError, match="unexpected entry"):
        extract_bundle(evil, tmp_path / "into")
    assert not (tmp_path / "outside.txt").exists()
    (tmp_path / "plain.tar.gz").write_text("not an archive")
    with pytest.raises(RegistryError, match="is not a .tar.gz bundle"):
        extract_bundle(tmp_path / "plain.tar.gz", tmp_path / "into")


@pytest.mark.unit
def test_reserved_numbers_are_skipped_and_a_reservation_never_goes_down(registry):
    registry.publish(bundle("a"), FIELDS)
    assert registry.reserve("v5") == (5, 6)  # e.g. releases up to model-v5 exist elsewhere
    assert registry.reserve(3) == (5, 6)  # a lower number changes nothing
    assert registry.versions() == [1] and registry.production_version() == 1
    assert registry.publish(bundle("b"), FIELDS).version == 6
    assert registry.reserve(2) == (5, 7)
    with pytest.raises(InvalidVersion):
        registry.reserve("latest")
    (registry.model_dir / "reserved").write_text("seven\n")
    with pytest.raises(RegistryError, match=r"reserved holds 'seven', not a version number"):
        registry.publish(bundle("c"), FIELDS)
    assert registry.versions() == [1, 6]


@pytest.mark.unit
def test_an_alias_move_judged_against_a_production_that_moved_since_is_refused(registry):
    registry.publish(bundle("a"), FIELDS)
    registry.publish(bundle("b"), FIELDS, set_production=False)
    before = tree_snapshot(registry.root)
    with pytest.raises(
        RegistryError, match=r"production moved while this candidate was judged against v2 \(it is now v1\)"
    ):
        registry.publish(bundle("c"), FIELDS, expected_production=2)
    with pytest.raises(RegistryError, match=r"judged against no production model \(it is now v1\)"):
        registry.set_production(2, expected_production=None)
    assert tree_snapshot(registry.root) == before
    assert registry.set_production(2, {"by": "test", "reason": "why"}, expected_production=1) == (1, 2)
    moves = registry.history()
    assert [(event["from"], event["to"], event["by"]) for event in moves] == [(None, 1, "publish"), (1, 2, "test")]
    assert moves[-1]["reason"] == "why" and moves[-1]["at"]


@pytest.mark.unit
def test_the_evaluation_set_is_checksummed_and_changes_are_recorded(registry):
    assert registry.evaluation_set() is None
    first = registry.set_evaluation_set(b"a,target\n1,0\n", {"rows": 1, "reason": "seed"}, only_if_absent=True)
    assert first is not None and registry.evaluation_set() == (b"a,target\n1,0\n", first)
    assert registry.set_evaluation_set(b"other\n", {"rows": 0}, only_if_absent=True) is None  # seeding keeps it
    second = registry.set_evaluation_set(b"a,target\n2,1\n", {"rows": 1, "reason": "new harvest"})
    events = [event for event in registry.history() if event["action"] == "evaluation-set"]
    assert [event["reason"] for event in events] == ["seed", "new harvest"]
    assert events[1]["previous_sha256"] == first["sha256"] and events[1]["sha256"] == second["sha256"]
    (registry.evaluation_dir / "evaluation.csv").write_bytes(b"a,target\n3,2\n")
    with pytest.raises(ChecksumError, match=r"evaluation.csv does not match its sha256 .* changed by hand"):
        registry.evaluation_set()
    registry.history_path.write_text('{"action": "production"}\nnot json\n')
    with pytest.raises(RegistryError, match=r"history.jsonl line 2 is not valid JSON"):
        registry.history()
