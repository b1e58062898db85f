"""The tuner (``make tune MODEL=name`` / ``python -m loadtest.tune name``): the fastest configuration of one
model on this machine under a p95 budget, in the spirit of Triton's Model Analyzer (docs/your-model.md,
"Make it fast").

A real nnserve server per worker count serves the model; each configuration is applied live through the
management API (threads, instances, batching and variant change without a restart) and measured with wrk
at each concurrency (closed loop). The search is staged so that one model takes at most ``--max-minutes``:

1. execution: workers x instances x intra-op threads that do not oversubscribe the cores, default batching;
2. batching: ``max_batch_size`` x ``max_queue_delay`` on the best two execution points;
3. adaptive: a lone-request session with all of a worker's cores beside 1-thread instances, on the best two;
4. variants: the store's gated INT8 entry (``<name>-int8``, its accuracy gate passed) on the best points.

A configuration meets the budget when its p95 is within it at every concurrency, with no errors; among those
the highest geometric mean of goodput (2xx/s) over the concurrencies wins. The table, a throughput-vs-p95
plot with each concurrency's Pareto front, and every measurement (JSON) go to ``--out``; the winner's entry
is written into the models config atomically (temp file, rename), or sent with ``--apply``.

- ``sweep``: the points, the servers, the measurements;
- ``report``: the choice, the table, the plot, the models config entry.
"""
