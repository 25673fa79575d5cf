"""Group ``ingestion``: the raw wine frame."""

import dagster as dg
import pandas as pd

from wine_assets.ingestion import IngestionError, class_counts, load_raw
from wine_assets.pipeline.metadata import frame_preview
from wine_assets.pipeline.resources import WineParamsResource


@dg.asset(
    group_name="ingestion",
    code_version="1",
    kinds={"pandas"},
    description=(
        "The wine recognition data: scikit-learn's built-in copy (178 rows, 13 features, 3 classes) "
        "or the CSV named by data.source in params.yaml. Unvalidated: the checks on this asset decide "
        "whether anything downstream may use it."
    ),
)
def raw_wine(context: dg.AssetExecutionContext, params: WineParamsResource) -> dg.Output[pd.DataFrame]:
    try:
        raw = load_raw(params.values)
    except IngestionError as exc:
        raise dg.Failure(description=str(exc), metadata={"params_file": params.values.origin}) from exc
    context.log.info("loaded %d rows x %d columns from %s", *raw.frame.shape, raw.source)
    return dg.Output(
        raw.frame,
        data_version=dg.DataVersion(raw.fingerprint),
        metadata={
            "rows": len(raw.frame),
            "columns": len(raw.frame.columns),
            "source": raw.source,
            "fingerprint": raw.fingerprint,
            "class_counts": class_counts(raw.frame),
            "preview": frame_preview(raw.frame),
        },
    )
