"""Side-by-side benchmarks -> docs/bench.md and docs/img/bench-*.png (``make bench``).

    python -m loadtest.bench                                   # the record (make bench)
    python -m loadtest.bench --duration 2 --sweep-duration 1 --rounds 1 --runs 30 --max-seconds 0.5 \\
        --overload-seconds 3 --budget-duration 5 --skip-step-loop --skip user-model --skip triton \\
        --out /tmp/b   # smoke: every part but two, a few minutes, not the record
    python -m loadtest.bench --duration 5 --skip in-process --skip stacks --skip generate --skip recovery \\
        --skip overload --skip budgets --skip baselines --skip user-model --out /tmp/b   # only the triton part
    python -m loadtest.bench --duration 5 --skip in-process --skip nnserve --skip generate --skip baselines \\
        --out /tmp/b                                           # only the user-model part

One module per part, run in this order by ``__main__``; each server runs alone (started, measured, stopped):

- ``inprocess``: PyTorch eager vs ONNX Runtime variants, no server.
- ``generate.bench_step_loop``: the bare generation step-loop limit, no server.
- on one nnserve server: ``generate.bench_streams`` (locust),
  ``triton`` (gRPC ModelStreamInfer beside REST /generate, image bytes over gRPC beside /classify),
  ``recovery`` (a 10,000-item request, then small ones), ``overload`` (300 clients, asyncio), ``budgets``
  (the locust load test with budgets), ``server_info`` (models, settings, memory);
- ``compare`` (part 2, "stacks"): each peer of ``loadtest/baselines`` swept over its grid (workers x
  batching), then nnserve, the bare HTTP stack and each peer's best configurations in ``--rounds``
  interleaved rounds, each server alone (wrk on /classify, /features, /v2); then ``profile``: the CPU
  breakdown of a /classify request, in process;
- ``user_model``: a user's EfficientNet-B0 (224x224) made with ``models.finetune`` + ``export``, on
  ``/classify`` of an nnserve serving only it, then of plain FastAPI + ORT on the same store entry
  (``--user-model-tag`` reuses an entry an earlier run made; ``--skip user-model`` leaves it out);
- ``realsize``: vgg_fc7 and EfficientNet-B0, each first tuned (``loadtest.tune``), nnserve in the tuner's
  configuration beside every peer at its best (Triton included) in ``--real-size-rounds`` interleaved rounds;
- ``targets`` (the issue's goals, met or MISSED), ``plots`` and ``report`` -> docs/bench.md.

Every phase is bounded (``--duration`` per wrk row and locust level, ``--overload-seconds``,
``--budget-duration``, ``--runs``/``--max-seconds`` per in-process case), plus server start-ups.
"""
