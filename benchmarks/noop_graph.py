"""A chain of assets that do nothing, to measure what Dagster itself costs per step.

Two chains, of 1 and of 21 steps (groups chain_1 and chain_21). Run with the same executor and
instance settings as the real graph: the project's executor (in-process unless the run config
picks multiprocess or celery), values pickled by the default IO manager.
"""

import dagster as dg

from wine_assets.pipeline.executor import wine_assets_executor


def chain(length: int) -> list[dg.AssetsDefinition]:
    assets: list[dg.AssetsDefinition] = []
    for index in range(length):

        @dg.asset(name=f"noop_{length}_{index}", deps=assets[-1:], group_name=f"chain_{length}")
        def noop() -> None:
            return None

        assets.append(noop)
    return assets


# Both chains are always defined (a Celery worker loads the same definitions as the launcher);
# a run selects one with --select group:chain_1 or group:chain_21.
defs = dg.Definitions(assets=[*chain(1), *chain(21)], executor=wine_assets_executor)
