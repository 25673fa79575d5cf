"""Group ``features``: the stratified split and the scaler."""

import dagster as dg
import pandas as pd
from sklearn.preprocessing import StandardScaler

from wine_assets import model_format
from wine_assets.features import fit_scaler, frame_digest, split_frame
from wine_assets.files import sha256_bytes, write_bytes_atomic
from wine_assets.ingestion import class_counts
from wine_assets.pipeline.resources import WineParamsResource
from wine_assets.registry import SCALER_FILE


@dg.multi_asset(
    group_name="features",
    outs={
        "train_set": dg.AssetOut(
            code_version="1",
            kinds={"pandas"},
            description="Training rows: a stratified share (1 - data.test_size) of validated_wine.",
        ),
        "test_set": dg.AssetOut(
            code_version="1",
            kinds={"pandas"},
            description="Held-out rows: a stratified share data.test_size of validated_wine.",
        ),
    },
)
def train_test_split_assets(validated_wine: pd.DataFrame, params: WineParamsResource):
    data = params.values.data
    train, test = split_frame(validated_wine, data.test_size, data.random_state)
    common = {"test_size": data.test_size, "random_state": data.random_state}
    # Data versions identify the exact rows, so a release can prove it uses the evaluated split.
    for name, part in (("train_set", train), ("test_set", test)):
        yield dg.Output(
            part,
            output_name=name,
            data_version=dg.DataVersion(frame_digest(part)),
            metadata={"rows": len(part), "class_counts": class_counts(part), **common},
        )


@dg.asset(
    group_name="features",
    code_version="2",  # 2: stored as skops
    kinds={"scikitlearn"},
    description="A StandardScaler fitted on the training features only; also written to <artifacts_dir>/scaler.skops.",
)
def scaler(
    context: dg.AssetExecutionContext, train_set: pd.DataFrame, params: WineParamsResource
) -> dg.Output[StandardScaler]:
    fitted = fit_scaler(train_set)
    content = model_format.dumps(fitted)
    path = params.values.artifacts_dir / SCALER_FILE
    write_bytes_atomic(path, content)
    context.log.info("scaler written to %s", path)
    sha256 = sha256_bytes(content)
    return dg.Output(
        fitted,
        data_version=dg.DataVersion(sha256),
        metadata={"path": dg.MetadataValue.path(str(path)), "sha256": sha256, "features": len(fitted.mean_)},
    )
