"""The ``wine-assets`` command: summary, registry management (and more subcommands over time).

Results go to standard output; errors go to standard error with a non-zero exit code:
1 when an operation fails (a checksum mismatch, nothing in production), 2 when the input
is wrong (a bad params file, an unknown version, bad arguments).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from wine_assets import services, signing
from wine_assets.files import write_bytes_atomic
from wine_assets.params import PARAMS_ENV_VAR, Params, ParamsError, load_params
from wine_assets.registry import (
    METRICS_FILE,
    MODEL_FILE,
    SCALER_FILE,
    InvalidVersion,
    ModelRegistry,
    RegistryError,
    VersionNotFound,
    extract_bundle,
)
from wine_assets.signing import SigningError, Trust

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2


class CliError(Exception):
    def __init__(self, message: str, code: int = EXIT_FAILED):
        super().__init__(message)
        self.code = code


def _params(args: argparse.Namespace) -> Params:
    try:
        return load_params(args.params)
    except ParamsError as exc:
        raise CliError(str(exc), EXIT_BAD_INPUT) from exc


def _registry(args: argparse.Namespace) -> ModelRegistry:
    """The registry --registry or the params name, trusting the keys the params list."""
    params = _params(args)
    try:
        trust = Trust.from_config(params.registry.trusted_keys)
    except SigningError as exc:
        raise CliError(str(exc), EXIT_BAD_INPUT) from exc
    return ModelRegistry(Path(args.registry) if args.registry else params.registry_dir, trust=trust)


def _out(text: str = "") -> None:
    sys.stdout.write(text + "\n")


def _format_table(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows
    )


def cmd_summary(args: argparse.Namespace) -> int:
    params = _params(args)
    metrics_path = params.artifacts_dir / "metrics.json"
    if not metrics_path.is_file():
        raise CliError(f"no metrics at {metrics_path}: run the pipeline first (make run)")
    from wine_assets.report import ReportError, read_json

    try:
        metrics = read_json(metrics_path, "metrics")
    except ReportError as exc:
        raise CliError(str(exc)) from exc
    missing = [name for name in ("accuracy", "f1_macro") if not isinstance(metrics.get(name), (int, float))]
    if missing:
        raise CliError(f"{metrics_path} has no numeric {', '.join(missing)}: re-run the pipeline")
    registry = ModelRegistry(params.registry_dir)  # reads only the alias: no signature involved
    production = registry.production_version()
    threshold = params.evaluation.min_accuracy
    passed = metrics["accuracy"] >= threshold
    _out(f"test accuracy   {metrics['accuracy']:.4f} ({'passes' if passed else 'FAILS'} the gate of {threshold:.2f})")
    _out(f"f1 (macro)      {metrics['f1_macro']:.4f}")
    data = metrics.get("data", {})
    _out(f"data            {data.get('source')} ({data.get('train_rows')} train / {data.get('test_rows')} test rows)")
    _out(f"artifacts       {params.artifacts_dir}")
    for name in (
        MODEL_FILE,
        SCALER_FILE,
        METRICS_FILE,
        "plots/confusion_matrix.png",
        "plots/feature_importance.png",
    ):
        path = params.artifacts_dir / name
        _out(f"  {'ok     ' if path.is_file() else 'missing'} {name}")
    if production is None:
        _out(f"production      none yet in {registry.model_dir}")
    else:
        _out(f"production      v{production} in {registry.version_dir(production)}")
    return EXIT_OK if passed else EXIT_FAILED


def cmd_predict(args: argparse.Namespace) -> int:
    from wine_assets.predict import PredictionInputError, format_predictions, predict, read_input

    registry = _registry(args)
    data = sys.stdin.buffer.read() if args.input == "-" else None
    try:
        frame = read_input(args.input, data)
        result = predict(frame, version=args.version, registry_dir=registry, strict=args.strict)
    except PredictionInputError as exc:
        raise CliError(f"{exc}", EXIT_BAD_INPUT) from exc
    text = format_predictions(result.predictions, args.format)
    if args.output:
        write_bytes_atomic(args.output, text.encode("utf-8"))
        sys.stderr.write(
            f"wine-assets: {len(result.predictions)} prediction(s) by v{result.version} written to {args.output}\n"
        )
    else:
        sys.stdout.write(text)
    return EXIT_OK


def cmd_report(args: argparse.Namespace) -> int:
    import os

    from wine_assets.report import ReportError, load_baseline, plot_links, read_json, render

    params = _params(args)
    metrics_path = Path(args.metrics) if args.metrics else params.artifacts_dir / "metrics.json"
    output = Path(args.output) if args.output else None
    try:
        current = read_json(metrics_path, "current metrics")
        baseline = load_baseline(args.baseline, ModelRegistry.from_params(params))
    except ReportError as exc:
        raise CliError(str(exc), EXIT_BAD_INPUT) from exc
    checks = None
    home = os.environ.get("DAGSTER_HOME")
    if home and not Path(home).is_dir():
        raise CliError(f"DAGSTER_HOME={home} is not a folder: point it at the instance the pipeline ran with")
    if home:
        import dagster as dg

        from wine_assets.definitions import defs
        from wine_assets.pipeline.history import latest_check_results

        with dg.DagsterInstance.get() as instance:
            checks = latest_check_results(instance, defs)
    report_dir = (output.parent if output else Path.cwd()).resolve()
    text = render(
        current,
        baseline,
        current.get("params") or params.to_dict(),
        checks,
        plot_links(metrics_path.resolve().parent, report_dir),
    )
    if output:
        write_bytes_atomic(output, text.encode("utf-8"))
        sys.stderr.write(f"wine-assets: report written to {output}\n")
    else:
        sys.stdout.write(text)
    return EXIT_OK


def cmd_registry_list(args: argparse.Namespace) -> int:
    registry = _registry(args)
    versions = registry.versions()
    if not versions:
        _out(f"no versions in {registry.model_dir} yet: run the release job to publish one")
        return EXIT_OK
    production = registry.production_version()
    rows = [["version", "created_at", "accuracy", "f1_macro", "data", "production"]]
    for version in versions:
        manifest = registry.manifest(version)
        metrics = manifest.get("metrics", {})
        rows.append(
            [
                f"v{version}",
                str(manifest.get("created_at", "")),
                f"{metrics.get('accuracy', float('nan')):.4f}",
                f"{metrics.get('f1_macro', float('nan')):.4f}",
                str(manifest.get("data_fingerprint") or "")[:12],
                "*" if version == production else "",
            ]
        )
    _out(_format_table(rows))
    return EXIT_OK


def cmd_registry_show(args: argparse.Namespace) -> int:
    registry = _registry(args)
    version = registry.resolve(args.version)
    verified = registry.verified(version)
    manifest = verified.manifest
    if args.json:
        _out(json.dumps(manifest, indent=2))
        return EXIT_OK
    production = registry.production_version()
    _out(f"{manifest['name']} v{version}{'  (production)' if version == production else ''}")
    _out(f"  path         {registry.version_dir(version)}")
    _out(f"  tag          {manifest.get('tag')}")
    _out(f"  created_at   {manifest.get('created_at')}")
    _out(f"  data         {manifest.get('data_source')} sha256 {manifest.get('data_fingerprint')}")
    _out(f"  git commit   {manifest.get('git_commit') or 'unknown'}")
    _out(f"  dagster run  {manifest.get('dagster_run_id') or 'unknown'}")
    _out(f"  signed by    key {verified.signer} (trusted)")
    _out("  metrics")
    for name, value in manifest.get("metrics", {}).items():
        _out(f"    {name:<20} {value:.4f}")
    _out("  files (sha256 verified)")
    for name, entry in manifest["files"].items():
        _out(f"    {name:<20} {entry['sha256']}  {entry['bytes']} bytes")
    return EXIT_OK


def cmd_registry_rollback(args: argparse.Namespace) -> int:
    """The one explicit override of the release rules: allowed, judged for the record, and recorded."""
    from wine_assets.release import ReleaseError, challenge_version

    registry = _registry(args)
    target = registry.resolve(args.version)
    try:
        verdict = challenge_version(registry, target, _params(args))
    except ReleaseError as exc:
        verdict = None  # a damaged production is what a rollback repairs: judged as "cannot compare"
        _out(f"not compared with production: {exc}")
    if verdict is not None and verdict.production_version is not None and verdict.production_version != target:
        if verdict.comparisons and not verdict.passed:
            _out(f"warning: {verdict.message}")
            _out("rolling back anyway, as asked; the verdict is recorded in the history")
        elif verdict.comparisons:
            _out(verdict.message)
    event = {
        "by": "registry rollback",
        "reason": args.reason,
        "challenge": verdict.to_dict() if verdict is not None else None,
    }
    previous, current = registry.set_production(target, event)
    if previous == current:
        _out(f"production is already v{current}")
    else:
        _out(f"production moved from {'v' + str(previous) if previous else 'none'} to v{current} (recorded)")
    return EXIT_OK


def cmd_registry_history(args: argparse.Namespace) -> int:
    registry = _registry(args)
    events = registry.history()
    if args.json:
        _out(json.dumps(events, indent=2))
        return EXIT_OK
    if not events:
        _out(f"no alias moves recorded in {registry.history_path} yet")
        return EXIT_OK
    rows = [["at", "action", "from", "to", "by", "verdict", "reason"]]
    for event in events:
        judged = event.get("challenge") or {}
        verdict = judged.get("passed")
        if verdict is not None and judged.get("production_version") is None:
            verdict = None  # nothing was in production to compare with
        if event.get("action") == "evaluation-set":
            moved, target = "", f"{str(event.get('sha256', ''))[:12]} ({event.get('rows')} rows)"
        else:
            moved = f"v{event['from']}" if event.get("from") else "none"
            target = f"v{event.get('to')}"
        rows.append(
            [
                str(event.get("at", "")),
                str(event.get("action", "")),
                moved,
                target,
                str(event.get("by") or event.get("source") or ""),
                "" if verdict is None else ("not worse" if verdict else "worse"),
                str(event.get("reason") or ""),
            ]
        )
    _out(_format_table(rows))
    return EXIT_OK


def cmd_registry_evaluation_set(args: argparse.Namespace) -> int:
    from wine_assets.ingestion import IngestionError, read_csv_source
    from wine_assets.release import ReleaseError, evaluation_rows, frame_csv
    from wine_assets.validation import WineValidationError, validate_frame

    registry = _registry(args)
    if args.evaluation_command == "show":
        try:
            found = evaluation_rows(registry)
        except ReleaseError as exc:
            raise CliError(str(exc)) from exc
        if found is None:
            _out(f"no evaluation set in {registry.evaluation_dir} yet: the first release seeds it from its test set")
            return EXIT_OK
        frame, record = found
        counts = frame["target"].value_counts().sort_index()
        _out(f"evaluation set {registry.evaluation_dir} (sha256 verified)")
        for key in ("rows", "source", "reason", "set_at", "sha256"):
            _out(f"  {key:<8} {record.get(key)}")
        _out("  classes  " + ", ".join(f"{label}: {count}" for label, count in counts.items()))
        return EXIT_OK
    if not args.reason or not args.reason.strip():
        raise CliError("--reason is required: the evaluation set changes only with a recorded reason", EXIT_BAD_INPUT)
    source = Path(args.csv)
    try:
        frame, _ = read_csv_source(source, key="evaluation set")
        frame = validate_frame(frame, what=f"the evaluation set {source}")
    except (IngestionError, WineValidationError) as exc:
        raise CliError(str(exc), EXIT_BAD_INPUT) from exc
    record = registry.set_evaluation_set(
        frame_csv(frame), {"rows": len(frame), "source": str(source.resolve()), "reason": args.reason.strip()}
    )
    assert record is not None  # only_if_absent is off
    _out(f"the evaluation set is now {source} ({len(frame)} rows, sha256 {record['sha256'][:12]}); recorded")
    return EXIT_OK


def cmd_registry_export(args: argparse.Namespace) -> int:
    registry = _registry(args)
    version = registry.resolve(args.version)
    output = Path(args.output or f"{registry.name}-v{version}.tar.gz")
    registry.export(version, output)
    _out(f"exported v{version} to {output}")
    return EXIT_OK


def cmd_registry_import(args: argparse.Namespace) -> int:
    import tempfile

    registry = _registry(args)
    source = Path(args.bundle)
    if not source.exists():
        raise CliError(f"bundle not found: {source}", EXIT_BAD_INPUT)
    with tempfile.TemporaryDirectory() as scratch:
        folder = source if source.is_dir() else extract_bundle(source, Path(scratch))
        expected, event = _judge_import(registry, folder, args) if args.production else (None, None)
        version, added = registry.import_dir(
            folder, set_production=args.production, expected_production=expected, event=event
        )
    state = "imported as" if added else "already present as"
    production = f"; production is v{registry.production_version()}" if args.production else ""
    _out(f"{source}: {state} v{version}{production}")
    return EXIT_OK


def _judge_import(registry: ModelRegistry, folder: Path, args: argparse.Namespace) -> tuple[int | None, dict]:
    """An imported bundle becomes production only through the release rules (on the evaluation set)."""
    from wine_assets.registry import load_dir
    from wine_assets.release import ReleaseError, challenge

    bundle = load_dir(folder, registry.trust)  # signature and checksums verified before any file is loaded
    try:
        verdict = challenge(bundle.model, bundle.scaler, registry, _params(args), candidate_version=bundle.version)
    except ReleaseError as exc:
        raise CliError(f"{args.bundle}: not imported: {exc}") from exc
    if not verdict.passed:
        raise CliError(
            f"{args.bundle}: not imported: {verdict.message}. Production is still v{verdict.production_version}; "
            f"to make it production anyway, import without --production, then "
            f"wine-assets registry rollback {bundle.version} --reason '...'"
        )
    if verdict.comparisons:
        _out(verdict.message)
    return verdict.production_version, {"challenge": verdict.to_dict()}


def cmd_registry_sign(args: argparse.Namespace) -> int:
    registry = _registry(args)
    versions = [registry.resolve(version) for version in args.versions] or registry.versions()
    if not versions:
        raise CliError(f"no versions in {registry.model_dir} to sign")
    try:
        for version in versions:
            old, new = registry.sign(version)
            _out(f"v{version}: signed by key {new}" + ("" if old == new else f" (was {old})"))
    except SigningError as exc:
        raise CliError(str(exc), EXIT_BAD_INPUT) from exc
    return EXIT_OK


def cmd_keys_new(args: argparse.Namespace) -> int:
    named = args.output or os.environ.get(signing.SIGNING_KEY_FILE_ENV, "").strip()
    path = Path(named).expanduser() if named else signing.default_key_file()
    pem = signing.new_private_key_pem()
    try:
        signing.write_private_key(path, pem)
    except (SigningError, OSError) as exc:
        raise CliError(str(exc), EXIT_BAD_INPUT) from exc
    public = signing.public_key_text(signing.private_key_from_pem(pem, str(path)))
    _out(f"wrote {path} (readable by you only; never commit it)")
    _out(f"public key {public}  (key id {signing.key_id(public)})")
    _out("readers trust it with: registry.trusted_keys in params.yaml, or $WINE_ASSETS_TRUSTED_KEYS")
    return EXIT_OK


def cmd_keys_public(args: argparse.Namespace) -> int:
    try:
        key = signing.signing_key()
    except SigningError as exc:
        raise CliError(str(exc), EXIT_BAD_INPUT) from exc
    if key is None:
        raise CliError(f"no signing key at {signing.default_key_file()}: make one with wine-assets keys new")
    public = signing.public_key_text(key)
    _out(f"{public}  (key id {signing.key_id(public)})")
    return EXIT_OK


def cmd_registry_reserve(args: argparse.Namespace) -> int:
    reserved, upcoming = _registry(args).reserve(args.version)
    _out(f"numbers up to v{reserved} are taken; the next version is v{upcoming}")
    return EXIT_OK


def cmd_serve(args: argparse.Namespace) -> int:
    params = _params(args)
    settings = params.serving
    from wine_assets.serving import server

    if (args.workers or 1) > 64:
        raise CliError("--workers: at most 64", EXIT_BAD_INPUT)
    if args.graceful_seconds < 0:
        raise CliError("--graceful-seconds: 0 or more", EXIT_BAD_INPUT)
    from wine_assets.serving.access import TokenConfigError, Tokens

    try:  # once here, so bad tokens or keys are one message, not a worker failing at start-up over and over
        Tokens.from_settings(settings)
        Trust.from_config(params.registry.trusted_keys)
    except (TokenConfigError, SigningError) as exc:
        raise CliError(str(exc), EXIT_BAD_INPUT) from exc
    try:
        server.run(
            params,
            host=args.host or settings.host,
            port=args.port if args.port is not None else settings.port,
            workers=args.workers if args.workers is not None else settings.workers,
            graceful_seconds=args.graceful_seconds,
            access_log=args.access_log,
        )
    except server.ServeError as exc:
        raise CliError(str(exc), EXIT_BAD_INPUT) from exc
    return EXIT_OK


def cmd_serving_token_new(args: argparse.Namespace) -> int:
    """A fresh token, shown once, and the serving.tokens entry (its hash) that makes the server accept it."""
    from pydantic import ValidationError

    from wine_assets.params import ServingToken
    from wine_assets.serving.access import TOKENS_ENV, hash_token, new_token, params_entry

    scopes = list(dict.fromkeys(args.scope or ["feedback"]))
    token = new_token()
    try:
        ServingToken(name=args.name, sha256=hash_token(token), scopes=scopes)
    except ValidationError:
        raise CliError(
            f"--name {args.name!r}: use 1 to 64 letters, digits and . _ @ - (starting with a letter or digit)",
            EXIT_BAD_INPUT,
        ) from None
    _out("token (shown this once; keep it secret, send it as 'Authorization: Bearer <token>'):")
    _out(token)
    _out(f"add this entry to serving.tokens in params.yaml (or to the list in {TOKENS_ENV}), then restart:")
    _out(params_entry(args.name, token, scopes))
    return EXIT_OK


def _add_serving_token_commands(serving_commands: argparse._SubParsersAction) -> None:
    token = serving_commands.add_parser(
        "token", help='bearer tokens that may write to the server (README "Who may write to the server")'
    )
    token_commands = token.add_subparsers(dest="token_command", metavar="ACTION", required=True)
    new = token_commands.add_parser(
        "new",
        help="print a fresh random token once, and the serving.tokens entry (its sha256) to configure",
        description=(
            "Make a token (32 random bytes, URL-safe base64) and print it once with the params entry that holds "
            "its SHA-256. Only the hash is configured; the token is not stored anywhere."
        ),
    )
    new.add_argument("--name", required=True, help="who holds the token (recorded with each label it sends)")
    new.add_argument(
        "--scope",
        action="append",
        choices=("feedback", "predict"),
        help="feedback (POST /feedback, the default) or predict (scoring, with serving.require_auth_for_predictions);"
        " repeat for both",
    )
    new.set_defaults(handler=cmd_serving_token_new)


def cmd_serving_report(args: argparse.Namespace) -> int:
    params = _params(args)
    from wine_assets.serving.report import ReportError, build_report, format_report, latest_experiment, read_rows

    path = Path(args.log) if args.log else params.serving_log_path
    if path is None:
        raise CliError("serving.log_path is null: no prediction log is kept (give one with --log)", EXIT_BAD_INPUT)
    experiment = args.experiment or params.serving.experiment or latest_experiment(path)
    min_labelled = args.min_labelled if args.min_labelled is not None else params.serving.min_labelled
    try:
        report = build_report(read_rows(path, experiment), experiment, min_labelled, args.alpha)
    except ReportError as exc:
        raise CliError(str(exc)) from exc
    _out(json.dumps(report.to_dict(), indent=2) if args.json else format_report(report).rstrip("\n"))
    return EXIT_OK


def _grid_error(exc: Exception) -> CliError:
    return CliError(str(exc), EXIT_BAD_INPUT)


def _print_run(run) -> None:  # noqa: ANN001 (a PartitionRun; the grid module imports Dagster)
    verdict = "ok" if run.success else f"FAILED: {run.problem}"
    sys.stderr.write(f"wine-assets: {run.job} {run.label} ({run.seconds:.1f} s): {verdict}\n")


def cmd_experiment_run(args: argparse.Namespace) -> int:
    params = _params(args)
    from wine_assets.experiments import format_results, read_results
    from wine_assets.pipeline.grid import GridError, run_grid
    from wine_assets.tracking import TrackingError

    try:
        outcome = run_grid(args.params, workers=args.workers, datasets=args.dataset, on_run=_print_run)
    except (GridError, ParamsError, TrackingError) as exc:
        raise _grid_error(exc) from exc
    seconds = {run.job: 0.0 for run in outcome.runs}
    for run in outcome.runs:
        seconds[run.job] += run.seconds
    for dataset in outcome.decided:
        _out(format_results(dataset, *read_results(params, dataset)))
    failed = [run for run in outcome.runs if not run.success]
    _out(
        f"{len(outcome.runs)} runs ({len(failed)} failed) on DAGSTER_HOME; "
        + ", ".join(f"{job} {total:.1f} s" for job, total in seconds.items())
    )
    for dataset, why in outcome.blocked.items():
        sys.stderr.write(f"wine-assets: error: dataset {dataset!r} not compared: {why}\n")
    return EXIT_OK if outcome.success else EXIT_FAILED


def cmd_experiment_show(args: argparse.Namespace) -> int:
    params = _params(args)
    from wine_assets.experiments import format_results, read_results

    names = args.dataset or list(params.experiments.datasets)
    for name in names:
        if name not in params.experiments.datasets:
            raise CliError(f"no dataset {name!r} in experiments.datasets of {params.origin}", EXIT_BAD_INPUT)
        _out(format_results(name, *read_results(params, name)))
    return EXIT_OK


def cmd_experiment_release(args: argparse.Namespace) -> int:
    params = _params(args)
    from wine_assets.pipeline.grid import GridError, release_winner

    if args.dry_run:
        return _experiment_release_plan(params, args.dataset)
    try:
        run = release_winner(args.params, args.dataset)
    except (GridError, ParamsError) as exc:
        raise _grid_error(exc) from exc
    if not run.success:
        raise CliError(f"nothing released from dataset {args.dataset!r}: {run.problem} (run {run.run_id})")
    released = run.metadata["experiments/challenger_release"]
    version, production = released["version"], released["production"]
    new = "" if released["new_version"] else " (the same files as an existing version: no new version)"
    _out(f"released {released['variant']} from {args.dataset} as v{version}{new}")
    if params.experiments.release_as == "candidate":
        _out(
            f"production stays {production}; to A/B test it, set serving.experiment and "
            f"serving.candidate_version: {version}"
        )
    else:
        _out(f"production is {production}")
        _out(f"params file: {released.get('params_file')}")
        diff = str(released.get("params_diff", ""))
        if diff.startswith("```diff"):
            _out(diff.removeprefix("```diff\n").removesuffix("```").rstrip("\n"))
    return EXIT_OK


def _experiment_release_plan(params: Params, dataset: str) -> int:
    """--dry-run: what a release would publish and the params diff it would write; nothing is changed."""
    from wine_assets.experiments import read_results, winner_params_change

    if dataset not in params.experiments.datasets:
        raise CliError(
            f"{params.origin}: no dataset {dataset!r} in experiments.datasets "
            f"({', '.join(params.experiments.datasets)})",
            EXIT_BAD_INPUT,
        )
    try:
        _, decision = read_results(params, dataset)
    except FileNotFoundError as exc:
        raise CliError(exc.strerror or str(exc)) from exc
    if decision["winner"] == decision["champion"]:
        raise CliError(f"the decision on {dataset!r} keeps {decision['champion']}: there is nothing to release")
    _out(f"dry run: would release {decision['winner']} from {dataset} as {params.experiments.release_as}")
    try:
        change = winner_params_change(decision, params)
    except ParamsError as exc:
        raise CliError(str(exc), EXIT_BAD_INPUT) from exc
    if change is None:
        _out("no params file would be written (released as a candidate, or no params file is in use)")
    elif not change.changed:
        _out(f"{change.path} already names this model")
    else:
        _out(change.diff.rstrip("\n"))
    _out("nothing was changed")
    return EXIT_OK


def _port(text: str) -> int:
    if not text.isdigit() or not 0 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port (0-65535)")
    return int(text)


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return int(text)


def _share(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number between 0 and 1")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wine-assets",
        description="Inspect the wine_assets pipeline's results and manage its model registry.",
    )
    parser.add_argument(
        "--params",
        metavar="FILE",
        help=f"params file (default: ${PARAMS_ENV_VAR}, else ./params.yaml, else built-in defaults)",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    summary = commands.add_parser(
        "summary", help="accuracy, artifacts and production version of the last run (exit 1 when the gate fails)"
    )
    summary.set_defaults(handler=cmd_summary)

    registry_option = argparse.ArgumentParser(add_help=False)
    registry_option.add_argument("--registry", metavar="DIR", help="registry folder (default: paths.registry_dir)")

    predict = commands.add_parser(
        "predict",
        parents=[registry_option],
        help="predict classes for a CSV or JSON file of wines",
        description=(
            "Predict the class of each row with a released model. INPUT is a CSV file, a JSON file of "
            "records, or - for standard input. Column order does not matter; extra columns are ignored "
            "with a warning. Invalid input exits with code 2 and writes nothing."
        ),
    )
    predict.add_argument("input", metavar="INPUT", help="a .csv or .json file, or - for standard input")
    predict.add_argument("--version", help="a registry version such as 3 or v3 (default: production)")
    predict.add_argument("--format", choices=("csv", "json"), default="csv", help="output format (default: csv)")
    predict.add_argument("--output", metavar="FILE", help="write here instead of standard output")
    predict.add_argument("--strict", action="store_true", help="refuse columns the model does not use")
    predict.set_defaults(handler=cmd_predict)

    report = commands.add_parser(
        "report",
        help="markdown report: metrics against a baseline, changed params, checks, plots",
        description=(
            "Write the markdown a reviewer reads on a pull request. The baseline is the production model "
            "in the registry (default) or a metrics.json file, e.g. the main branch's."
        ),
    )
    report.add_argument("--baseline", default="production", metavar="production|PATH", help="default: production")
    report.add_argument("--metrics", metavar="PATH", help="current metrics (default: <artifacts_dir>/metrics.json)")
    report.add_argument("--output", metavar="FILE", help="write here instead of standard output")
    report.set_defaults(handler=cmd_report)

    registry = commands.add_parser(
        "registry", parents=[registry_option], help="list, show and roll back released model versions"
    )
    registry_commands = registry.add_subparsers(dest="registry_command", metavar="ACTION", required=True)
    listing = registry_commands.add_parser("list", help="every published version; * marks production")
    listing.set_defaults(handler=cmd_registry_list)
    show = registry_commands.add_parser("show", help="a version's manifest, checksums verified")
    show.add_argument("version", nargs="?", help="a version such as 3 or v3 (default: production)")
    show.add_argument("--json", action="store_true", help="print the manifest as JSON")
    show.set_defaults(handler=cmd_registry_show)
    rollback = registry_commands.add_parser(
        "rollback",
        help="make a version production (an explicit override: it says when the version is worse, and is recorded)",
    )
    rollback.add_argument("version", help="a version such as 3 or v3")
    rollback.add_argument("--reason", help="why, kept in the registry's history")
    rollback.set_defaults(handler=cmd_registry_rollback)
    history = registry_commands.add_parser("history", help="every move of the production alias, with its verdict")
    history.add_argument("--json", action="store_true", help="print the history as JSON")
    history.set_defaults(handler=cmd_registry_history)
    evaluation = registry_commands.add_parser(
        "evaluation-set", help="the frozen, labelled rows every release is judged on: show it, or replace it"
    )
    evaluation_commands = evaluation.add_subparsers(dest="evaluation_command", metavar="ACTION", required=True)
    evaluation_commands.add_parser("show", help="where it came from, its rows and classes").set_defaults(
        handler=cmd_registry_evaluation_set
    )
    replace = evaluation_commands.add_parser("replace", help="freeze a labelled CSV as the evaluation set (recorded)")
    replace.add_argument("csv", help="a CSV with the 13 feature columns and target, validated like data.source")
    replace.add_argument("--reason", required=True, help="why, kept in the registry's history")
    replace.set_defaults(handler=cmd_registry_evaluation_set)
    export = registry_commands.add_parser("export", help="write a version as a .tar.gz bundle (for a release)")
    export.add_argument("version", nargs="?", help="a version such as 3 or v3 (default: production)")
    export.add_argument("--output", metavar="FILE", help="default: wine-classifier-v<N>.tar.gz")
    export.set_defaults(handler=cmd_registry_export)
    imported = registry_commands.add_parser(
        "import", help="add an exported bundle (.tar.gz or folder), checksums verified"
    )
    imported.add_argument("bundle", help="a .tar.gz from registry export, or its unpacked folder")
    imported.add_argument(
        "--production", action="store_true", help="also make it production (refused if worse than production)"
    )
    imported.set_defaults(handler=cmd_registry_import)
    reserve = registry_commands.add_parser(
        "reserve", help="take the numbers up to N (e.g. release tags made elsewhere): the next version is above"
    )
    reserve.add_argument("version", help="the highest number taken elsewhere, such as 7 or v7")
    reserve.set_defaults(handler=cmd_registry_reserve)
    signed = registry_commands.add_parser(
        "sign", help="sign versions again with the current signing key (after a key rotation; recorded)"
    )
    signed.add_argument("versions", nargs="*", help="versions such as 3 or v3 (default: every version)")
    signed.set_defaults(handler=cmd_registry_sign)

    keys = commands.add_parser("keys", help='the Ed25519 keys that sign model bundles (README "Security")')
    key_commands = keys.add_subparsers(dest="keys_command", metavar="ACTION", required=True)
    new_key = key_commands.add_parser("new", help="make a signing key (a PEM file readable by you only)")
    new_key.add_argument(
        "--output", metavar="FILE", help="default: $WINE_ASSETS_SIGNING_KEY_FILE, else ~/.config/wine-assets/"
    )
    new_key.set_defaults(handler=cmd_keys_new)
    key_commands.add_parser(
        "public", help="the public key of the signing key in use, for registry.trusted_keys elsewhere"
    ).set_defaults(handler=cmd_keys_public)

    services_parser = commands.add_parser(
        "services",
        help="start or stop the local PostgreSQL, Redis and Dask servers (make services, make services-down)",
        description=(
            "up: start PostgreSQL, Redis and a Dask scheduler with two workers on 127.0.0.1 (free ports), wait "
            "until each answers, write their addresses to the env file. down: stop exactly those processes."
        ),
    )
    services.add_arguments(services_parser)
    services_parser.set_defaults(handler=services.run)

    serve = commands.add_parser(
        "serve",
        help="serve the production model over HTTP (MLflow scoring protocol, Open Inference Protocol)",
        description=(
            "Start the HTTP API on uvicorn. Each worker loads the registry's production version (checksums "
            "verified), answers 503 until it is ready, and follows the production alias as it moves. Defaults "
            "come from the params file's serving section."
        ),
    )
    serve.add_argument("--host", help="address to bind (default: serving.host, 127.0.0.1)")
    serve.add_argument("--port", type=_port, help="port (default: serving.port, 8080)")
    serve.add_argument("--workers", type=_positive, help="worker processes (default: serving.workers, 1)")
    serve.add_argument(
        "--graceful-seconds",
        type=float,
        default=30.0,
        help="on SIGTERM, how long requests in flight may take to finish (default: 30)",
    )
    serve.add_argument("--access-log", action="store_true", help="log every request")
    serve.set_defaults(handler=cmd_serve)

    serving = commands.add_parser("serving", help="about the running service: the A/B report, its tokens")
    serving_commands = serving.add_subparsers(dest="serving_command", metavar="ACTION", required=True)
    serving_report = serving_commands.add_parser(
        "report",
        help="online accuracy per variant with intervals and a significance test",
        description=(
            "Compare the A/B variants from the prediction log: accuracy on the predictions that received "
            "feedback, 95%% Wilson intervals, Fisher's exact test (split) or McNemar's (shadow), agreement in "
            "shadow mode, and a warning when there are too few labelled predictions to decide."
        ),
    )
    serving_report.add_argument("--log", metavar="FILE", help="the prediction log (default: serving.log_path)")
    serving_report.add_argument("--experiment", help="default: serving.experiment, else the latest in the log")
    serving_report.add_argument("--min-labelled", type=_positive, help="default: serving.min_labelled")
    serving_report.add_argument("--alpha", type=_share, default=0.05, help="significance level (default: 0.05)")
    serving_report.add_argument("--json", action="store_true", help="print the report as JSON")
    serving_report.set_defaults(handler=cmd_serving_report)
    _add_serving_token_commands(serving_commands)

    experiment = commands.add_parser(
        "experiment", help="model variants on datasets: run the grid, show results, release a winner"
    )
    experiment_commands = experiment.add_subparsers(dest="experiment_command", metavar="ACTION", required=True)
    grid = experiment_commands.add_parser(
        "run",
        help="materialize every dataset, variant and decision of experiments in params (needs DAGSTER_HOME)",
    )
    grid.add_argument(
        "--workers", type=_positive, default=1, help="variant partitions run at once, in processes (default: 1)"
    )
    grid.add_argument("--dataset", action="append", help="only this dataset (repeatable; default: all)")
    grid.set_defaults(handler=cmd_experiment_run)
    shown = experiment_commands.add_parser("show", help="the last leaderboard and decision per dataset")
    shown.add_argument("--dataset", action="append", help="only this dataset (repeatable; default: all)")
    shown.set_defaults(handler=cmd_experiment_show)
    released = experiment_commands.add_parser(
        "release",
        help="publish a dataset's winning challenger (blocked by the challenger_won check when production stays)",
    )
    released.add_argument("--dataset", required=True, help="the dataset whose decision to act on")
    released.add_argument(
        "--dry-run", action="store_true", help="print what would be released and the params diff; change nothing"
    )
    released.set_defaults(handler=cmd_experiment_release)
    return parser


def _log_warnings_to_stderr() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("wine-assets: warning: %(message)s"))
    package_logger = logging.getLogger("wine_assets")
    package_logger.handlers[:] = [handler]
    package_logger.setLevel(logging.WARNING)
    package_logger.propagate = False


def main(argv: Sequence[str] | None = None) -> int:
    _log_warnings_to_stderr()
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except CliError as exc:
        return _fail(str(exc), exc.code)
    except (VersionNotFound, InvalidVersion) as exc:
        return _fail(str(exc), EXIT_BAD_INPUT)
    except RegistryError as exc:
        return _fail(str(exc), EXIT_FAILED)
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        return _fail(f"{where}{exc.strerror or exc}", EXIT_FAILED)


def _fail(message: str, code: int) -> int:
    sys.stderr.write(f"wine-assets: error: {message}\n")
    return code


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
