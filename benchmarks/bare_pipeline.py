"""The pipeline's work without Dagster: the baseline the orchestrated run is measured against.

Loads the data named by the params file, validates it with the same pandera schema, runs the
same data checks (sample size, outliers), splits, scales, trains, evaluates, draws both plots
and writes model, scaler, metrics and plots, by calling the same stage functions the assets
call. Usage: python bare_pipeline.py PARAMS_FILE  (WINE_BENCH_TIMING=1 prints the work's seconds)
"""

import os
import sys
import time

from wine_assets.evaluation import confusion_matrix_png, evaluate, feature_importance_png
from wine_assets.features import fit_scaler, split_frame
from wine_assets.files import joblib_bytes, write_bytes_atomic, write_json_atomic
from wine_assets.ingestion import load_raw
from wine_assets.params import load_params
from wine_assets.training import feature_importances, train_model
from wine_assets.validation import FEATURE_COLUMNS, check_sample_size, find_outliers, validate_frame


def main(params_file: str) -> float:
    params = load_params(params_file)
    out = params.artifacts_dir
    raw = load_raw(params).frame
    frame = validate_frame(raw)
    check_sample_size(raw, params.validation.min_rows_per_class, params.data.test_size)
    find_outliers(raw, params.validation.outlier_iqr_factor)
    train, test = split_frame(frame, params.data.test_size, params.data.random_state)
    scaler = fit_scaler(train)
    model = train_model(train, scaler, params.model).model
    metrics = evaluate(model, scaler, train, test)
    write_bytes_atomic(out / "scaler.joblib", joblib_bytes(scaler))
    write_bytes_atomic(out / "model.joblib", joblib_bytes(model))
    write_json_atomic(out / "metrics.json", metrics)
    write_bytes_atomic(
        out / "plots" / "confusion_matrix.png", confusion_matrix_png(metrics["confusion_matrix"], metrics["labels"])
    )
    write_bytes_atomic(
        out / "plots" / "feature_importance.png", feature_importance_png(feature_importances(model, FEATURE_COLUMNS))
    )
    return float(metrics["accuracy"])


if __name__ == "__main__":
    started = time.perf_counter()
    accuracy = main(sys.argv[1])
    if os.environ.get("WINE_BENCH_TIMING"):
        sys.stderr.write(f"work_seconds {time.perf_counter() - started:.4f}\n")
    print(f"accuracy {accuracy:.4f}")
