"""What the Dagster instance remembers, for the report: the latest result of every asset check."""

import dagster as dg

from wine_assets.report import CheckRow


def latest_check_results(instance: dg.DagsterInstance, defs: dg.Definitions) -> list[CheckRow]:
    """Each check of the graph with the result of its latest execution (pass, fail, warn, not run)."""
    keys = sorted(
        defs.resolve_asset_graph().asset_check_keys, key=lambda key: (key.asset_key.to_user_string(), key.name)
    )
    records = instance.event_log_storage.get_latest_asset_check_execution_by_key(keys)
    rows = []
    for key in keys:
        record = records.get(key)
        evaluation = None
        if record is not None and record.event is not None and record.event.dagster_event is not None:
            evaluation = record.event.dagster_event.event_specific_data
        if not isinstance(evaluation, dg.AssetCheckEvaluation):
            status = "not run"
        elif evaluation.passed:
            status = "pass"
        else:
            status = "warn" if evaluation.severity == dg.AssetCheckSeverity.WARN else "fail"
        rows.append(CheckRow(key.asset_key.to_user_string(), key.name, status, record.run_id if record else None))
    return rows
