"""``patchrec serve``: online recommendation over HTTP for every trained model kind (docs/serve.md).

- ``storage``: users' interactions and PerSRec states in SQLite (WAL), behind the ``Storage`` interface;
- ``scorers``: scoring batches of users for the ID models (popularity, sequence models, PerSRec from stored
  states); ``llm``: the adapter to the LLM stack (``patchrec.eval``); ``loading``: which model a directory is;
- ``service``: a batch's work (events, recommendations, state upkeep), one outcome per request;
- ``batcher``: the bounded queue and dynamic batching; ``app``: the FastAPI routes, validation and errors;
  ``middleware``: metrics, bearer auth, body limit; ``metrics``: Prometheus; ``server``: uvicorn, drain.

Only ``config`` and ``storage`` import without the ``serve`` extra (FastAPI, uvicorn, prometheus_client).
"""
