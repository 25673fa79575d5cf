"""The report's check history (wine_assets.pipeline.history.latest_check_results) over a small graph of
this file's own, materialized in-process: each check's latest result is pass, fail (ERROR severity),
warn (WARN severity) or not run, with the id of the run that executed it."""

from __future__ import annotations

import dagster as dg
import pytest

from wine_assets.pipeline.history import latest_check_results
from wine_assets.report import CheckRow

pytestmark = pytest.mark.component


@dg.asset
def bottles() -> int:
    return 12


@dg.asset
def corks() -> int:
    return 11


@dg.asset_check(asset=bottles)
def counted() -> dg.AssetCheckResult:
    return dg.AssetCheckResult(passed=True)


@dg.asset_check(asset=bottles)
def enough() -> dg.AssetCheckResult:
    return dg.AssetCheckResult(passed=False, severity=dg.AssetCheckSeverity.ERROR, description="12 < 24")


@dg.asset_check(asset=bottles)
def labelled() -> dg.AssetCheckResult:
    return dg.AssetCheckResult(passed=False, severity=dg.AssetCheckSeverity.WARN)


@dg.asset_check(asset=corks)
def one_per_bottle() -> dg.AssetCheckResult:
    return dg.AssetCheckResult(passed=True)


DEFS = dg.Definitions(assets=[bottles, corks], asset_checks=[counted, enough, labelled, one_per_bottle])


def test_each_check_has_its_latest_status_and_run(dagster_home):
    with dg.instance_for_test(temp_dir=str(dagster_home)) as instance:
        before = latest_check_results(instance, DEFS)
        result = dg.materialize([bottles, counted, enough, labelled], instance=instance, selection=["bottles"])
        rows = latest_check_results(instance, DEFS)
    assert before == [
        CheckRow("bottles", "counted", "not run", None),
        CheckRow("bottles", "enough", "not run", None),
        CheckRow("bottles", "labelled", "not run", None),
        CheckRow("corks", "one_per_bottle", "not run", None),
    ]
    assert result.success  # a failed check that does not block leaves the run successful
    assert rows == [
        CheckRow("bottles", "counted", "pass", result.run_id),
        CheckRow("bottles", "enough", "fail", result.run_id),
        CheckRow("bottles", "labelled", "warn", result.run_id),
        CheckRow("corks", "one_per_bottle", "not run", None),
    ]
