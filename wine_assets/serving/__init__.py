"""Online serving: ``wine-assets serve``, an HTTP API over the production model.

One module per concern, each a plain, tested part; ``app`` is the thin FastAPI layer over them:

* ``inputs``: request bodies (MLflow's scoring formats, CSV, Open Inference Protocol) to a
  checked ``[rows, 13]`` float array, or a ``RequestError`` with its HTTP status;
* ``forest``: a released bundle made ready to serve (verified, warmed, fast per-row scoring);
* ``state``: the models one worker serves, the production alias watcher, the A/B routing;
* ``log``: the append-only prediction and feedback log (SQLite, written off the request path);
* ``metrics``: Prometheus metrics, multiprocess-safe across uvicorn workers;
* ``access``: who may call what (bearer tokens, stored as hashes) and the ``Host`` allow-list;
* ``report``: online accuracy per variant, intervals and significance tests;
* ``server``: process set-up and uvicorn.
"""
