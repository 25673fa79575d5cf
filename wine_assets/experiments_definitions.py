"""The experiments code location (``workspace.yaml``): model variants x datasets, as partitions.

Kept apart from ``wine_assets.definitions`` so ``dagster asset materialize -m wine_assets
--select '*'`` (``make run``) keeps working: a partitioned asset in that location would need a
``--partition``. The partitions are read from the params when this module loads; a change of
``experiments.datasets`` or ``experiments.variants`` needs a reload of the definitions.
"""

import dagster as dg

from wine_assets.params import Params, load_params
from wine_assets.pipeline.executor import wine_assets_executor
from wine_assets.pipeline.experiments import build_experiment_assets, variant_names
from wine_assets.pipeline.resources import WineParamsResource


def build_definitions(params: Params, resource: WineParamsResource | None = None) -> dg.Definitions:
    """The location's Definitions, with one partition per dataset and per variant of ``params``."""
    built = build_experiment_assets(list(params.experiments.datasets), variant_names(params))
    return dg.Definitions(
        assets=built["assets"],
        asset_checks=built["asset_checks"],
        jobs=built["jobs"],
        resources={"params": resource or WineParamsResource()},
        executor=wine_assets_executor,
    )


defs = build_definitions(load_params())  # $WINE_ASSETS_PARAMS, else ./params.yaml, else the defaults
