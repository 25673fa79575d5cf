"""A chain of assets that do nothing, to measure what Dagster itself costs per step.

WINE_BENCH_STEPS sets the chain's length (default 1). Run with the same executor and
instance settings as the real graph: in-process, values pickled by the default IO manager.
"""

import os

import dagster as dg


def chain(length: int) -> list[dg.AssetsDefinition]:
    assets: list[dg.AssetsDefinition] = []
    for index in range(length):

        @dg.asset(name=f"noop_{index}", deps=assets[-1:])
        def noop() -> None:
            return None

        assets.append(noop)
    return assets


defs = dg.Definitions(assets=chain(int(os.environ.get("WINE_BENCH_STEPS", "1"))), executor=dg.in_process_executor)
