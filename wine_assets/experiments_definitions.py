"""The experiments code location (``workspace.yaml``): model variants x datasets, as partitions.

Kept apart from ``wine_assets.definitions`` so ``dagster asset materialize -m wine_assets
--select '*'`` (``make run``) keeps working: a partitioned asset in that location would need a
``--partition``. The partitions are read from the params when this module loads; a change of
``experiments.datasets`` or ``experiments.variants`` needs a reload of the definitions.
"""

from wine_assets.params import load_params
from wine_assets.pipeline.experiments import build_definitions

defs = build_definitions(load_params())  # $WINE_ASSETS_PARAMS, else ./params.yaml, else the defaults
