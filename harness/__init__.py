"""What the load tests, the benchmark, the test suite and the local cluster all need, with no dependency on
any of them: start/stop a real server in a subprocess (``harness.server``) and the inputs they send it
(``harness.data``).

Data flows models -> export -> service -> loadtest, and deploy must not import loadtest: this package sits
beside service and depends only on models (the held-out split) and the standard library.
"""
