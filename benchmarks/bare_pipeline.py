"""The pipeline's work without Dagster: the baseline the orchestrated run is measured against.

The same work as `dagster asset materialize -m wine_assets --select '*'`, by calling the same
stage functions the assets and checks call: load the data named by the params file, the data
checks (the pandera pass, sample size, outliers; drift has no reference in a fresh registry),
the schema validation, split, scale, train, evaluate, both plots, write model, scaler, metrics
and plots, the model checks, and the release to the registry (publish, load back, re-score).
Usage: python bare_pipeline.py PARAMS_FILE   (WINE_BENCH_TIMING=1 prints the work's seconds)
"""

import os
import sys
import time

from wine_assets import model_format
from wine_assets.evaluation import (
    compute_metrics,
    confusion_matrix_png,
    evaluate,
    feature_importance_png,
    predict_test,
)
from wine_assets.features import fit_scaler, frame_digest, split_frame
from wine_assets.files import sha256_bytes, write_bytes_atomic, write_json_atomic
from wine_assets.gates import accuracy_gate
from wine_assets.ingestion import load_raw
from wine_assets.params import load_params
from wine_assets.registry import MODEL_FILE, SCALER_FILE, ModelRegistry
from wine_assets.release import challenge, label_check, release
from wine_assets.training import feature_importances, train_model
from wine_assets.validation import (
    FEATURE_COLUMNS,
    TARGET_COLUMN,
    WineSchema,
    check_sample_size,
    collect_failures,
    find_outliers,
    validate_frame,
)


def main(params_file: str) -> float:
    params = load_params(params_file)
    out = params.artifacts_dir
    raw = load_raw(params).frame
    collect_failures(WineSchema, raw)
    check_sample_size(raw, params.validation.min_rows_per_class, params.data.test_size)
    find_outliers(raw, params.validation.outlier_iqr_factor)
    frame = validate_frame(raw)
    registry = ModelRegistry.from_params(params)
    label_check(frame, registry, params)
    train, test = split_frame(frame, params.data.test_size, params.data.random_state)
    scaler = fit_scaler(train)
    model = train_model(train, scaler, params.model).model
    scaler_bytes, model_bytes = model_format.dumps(scaler), model_format.dumps(model)
    write_bytes_atomic(out / SCALER_FILE, scaler_bytes)
    write_bytes_atomic(out / MODEL_FILE, model_bytes)
    metrics = evaluate(model, scaler, train, test)
    metrics["params"] = params.to_dict()
    write_json_atomic(out / "metrics.json", metrics)
    matrix = compute_metrics(test[TARGET_COLUMN].to_numpy(), predict_test(model, scaler, test))
    write_bytes_atomic(
        out / "plots" / "confusion_matrix.png", confusion_matrix_png(matrix["confusion_matrix"], matrix["labels"])
    )
    write_bytes_atomic(
        out / "plots" / "feature_importance.png", feature_importance_png(feature_importances(model, FEATURE_COLUMNS))
    )
    accuracy_gate(metrics["accuracy"], params.evaluation.min_accuracy)
    challenge(model, scaler, registry, params, test)
    evaluated = {
        MODEL_FILE: sha256_bytes(model_bytes),
        SCALER_FILE: sha256_bytes(scaler_bytes),
        "train_set": frame_digest(train),
        "test_set": frame_digest(test),
    }
    release(evaluated, metrics, train, test, params)
    return float(metrics["accuracy"])


if __name__ == "__main__":
    started = time.perf_counter()
    accuracy = main(sys.argv[1])
    if os.environ.get("WINE_BENCH_TIMING"):
        sys.stderr.write(f"work_seconds {time.perf_counter() - started:.4f}\n")
    print(f"accuracy {accuracy:.4f}")
