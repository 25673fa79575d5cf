"""The baseline of the serving benchmark: a plain FastAPI wrapper of ``wine_assets.predict.predict``.

What a first version of a model API usually is: read MLflow's ``dataframe_split`` JSON into a
DataFrame, call the
batch path (pandera-checked features, scikit-learn's ``predict_proba``), return the records.

    WINE_ASSETS_PARAMS=params.yaml uvicorn plain_fastapi:app --port 8081
"""

from __future__ import annotations

import pandas as pd
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from wine_assets.predict import PredictionInputError, predict

app = FastAPI()


@app.post("/invocations")
async def invocations(request: Request) -> JSONResponse:
    document = await request.json()
    split = document["dataframe_split"]
    frame = pd.DataFrame(split["data"], columns=split["columns"])
    try:
        result = predict(frame)
    except PredictionInputError as exc:
        return JSONResponse({"message": str(exc)}, status_code=400)
    return JSONResponse({"predictions": result.predictions.to_dict("records"), "model_version": result.version})
