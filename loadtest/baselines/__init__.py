"""Baseline servers for the benchmarks: the SAME lenet5 (and vgg_fc7) ONNX from the BentoML store, the SAME
request bytes (multipart POST ``/classify``, file field ``image``, optional ``top_k``), the same decode +
preprocessing as nnserve (``models.preprocess``), answering JSON top-k predictions. Only the serving stack
differs, so the bench compares stacks, not models. Each one is labelled by what it is:

- ``bentoml_book``: BentoML by the book: one ``@bentoml.service``, one batchable ``@bentoml.api`` doing
  decode + ORT in the same process (BentoML's adaptive batcher), ``bentoml serve``.
- ``litserve_server``: LitServe with its own batching (max_batch_size 32, batch_timeout 5 ms).
- ``fastapi_app``: plain FastAPI + ORT under uvicorn with 2 workers, no batching; also ``/features``
  (vgg_fc7's fc7 vector).

``launch.py`` starts one of them on a free port and stops it (one server at a time: they share the cores).
Not part of the service; their dependencies are the ``bench`` extra of pyproject.toml.
"""
