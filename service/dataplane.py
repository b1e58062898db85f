"""The data plane: what every front end asks of the server, in one place.

REST (rest.py), KServe v2 REST (kserve_http.py), KServe v2 gRPC (kserve_grpc.py) and OpenAI's API
(openai_api.py) are codecs: they
turn their wire format into calls on this object and its answers (or its errors, service/errors.py)
back into their wire format. Nothing below knows a protocol:

- readiness: one answer, per model its state and reason, the gRPC listener included; ``/readyz``,
  ``/v2/health/ready`` and gRPC ``ServerReady`` all render it, so they agree in every state;
- model and version resolution (a model that is unknown, loading, waiting for its export or failed
  answers NotFound / Unavailable with the reason), and each endpoint's default model;
- admission: at most ``NNSERVE_MAX_CONCURRENT_REQUESTS`` inference requests in progress per worker,
  REST, /v2 REST, /v1 and gRPC together; past it a request is refused at once (``Unavailable`` naming the
  limit: 503 + Retry-After, or gRPC UNAVAILABLE). The batcher's queue bounds sit behind it;
- inference through the version's dynamic batcher, counted under the real endpoint's label;
- generation start: a GenerationRequest validated and queued on the model's continuous batcher.

One DataPlane per worker process, over that worker's Repository (service/repository.py). Its methods
run on the worker's event loop (HTTP and gRPC share it), so the admission count needs no lock.

The shape follows KServe's Python server (``kserve/protocol/dataplane.py`` under its REST and gRPC
servicers), minus its per-request model lookups through dictionaries of wrappers: the hot path here is a
route lookup, a batcher call and the metrics.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument

from models.kinds import kinds_for
from models.vocab import Vocabulary
from service import metrics
from service.batching import BatchStats
from service.errors import ClientError, Unavailable
from service.generation import ContinuousBatcher, Generation, GenerationRequest
from service.repository import Repository
from service.runtime import ModelRuntime

GRPC_NOT_LISTENING = "KServe v2 gRPC is not listening yet"


@dataclass(frozen=True)
class Readiness:
    """Whether this worker serves everything it should; if not, why not. ``models``: name -> its state
    (``ready``, ``loading``, ``failed``, ``waiting``), version when ready, reason when not."""

    ready: bool
    reason: str | None
    models: dict[str, dict]

    def body(self) -> dict:
        return {"ready": self.ready, "models": self.models} | ({"reason": self.reason} if self.reason else {})


STARTING = Readiness(False, "the service is starting", {})


class DataPlane:
    def __init__(self, repository: Repository) -> None:
        self.repository = repository
        self.settings = repository.settings
        self.max_in_flight = self.settings.max_concurrent_requests
        self.in_flight = 0  # admitted inference requests of every protocol (event loop only)
        self.grpc_listening = False  # set by the service once its gRPC server has started

    # -- readiness ------------------------------------------------------------------------------------

    def readiness(self) -> Readiness:
        models = {m["name"]: {k: m[k] for k in ("state", "version", "reason") if m.get(k) is not None}
                  for m in self.repository.describe()}
        reasons = [] if self.grpc_listening else [GRPC_NOT_LISTENING]
        not_ready = self.repository.not_ready_reason()
        if not_ready:
            reasons.append(not_ready)
        return Readiness(not reasons, "; ".join(reasons) or None, models)

    # -- resolution -----------------------------------------------------------------------------------

    def model(self, name: str, version: str = "", endpoint: str | None = None) -> ModelRuntime:
        """The served model ``name`` in ``version`` (empty: as its routing picks), held until the request
        is over; with ``endpoint``, only if that endpoint takes its kind."""
        if endpoint is None:
            return self.repository.get(name, version)
        return self.repository.model_for(name, endpoint, version)

    def default_model(self, endpoint: str) -> str:
        return self.repository.default_model(endpoint)

    def models_for(self, endpoint: str) -> list[str]:
        """The served models (ready or not) of a kind ``endpoint`` takes, in config order: a model whose kind
        is not known yet (its first load still running) is left out."""
        kinds = kinds_for(endpoint)
        return [m.name for m in self.repository.snapshot().models if m.kind in kinds]

    def served_versions(self, name: str) -> list[str]:
        return self.repository.served_versions(name)

    # -- admission --------------------------------------------------------------------------------------

    def admit(self) -> None:
        """Take an inference slot, or refuse at once: call ``release()`` when the request is over."""
        if self.in_flight >= self.max_in_flight:
            raise Unavailable(f"server busy: {self.in_flight} requests in progress in this worker "
                              "(NNSERVE_MAX_CONCURRENT_REQUESTS); retry shortly", retry_after=1)
        self.in_flight += 1

    def release(self) -> None:
        self.in_flight -= 1

    # -- inference --------------------------------------------------------------------------------------

    async def infer(self, runtime: ModelRuntime, feeds: dict[str, np.ndarray], record: metrics.RequestMetrics
                    ) -> tuple[dict[str, np.ndarray], BatchStats]:
        """Checked inputs through the version's dynamic batcher; the batch wait and model time go to
        ``record`` (which the caller began and finishes)."""
        try:
            outputs, stats = await self.repository.batcher(runtime).infer(feeds)
        except InvalidArgument as e:  # ONNX Runtime rejected the input: a client mistake the checks missed
            raise ClientError(f"model {runtime.name!r} rejected the input: {e}") from e
        record.observe("batch_wait", stats.queue_s)
        record.observe("inference", stats.inference_s)
        return outputs, stats

    # -- generation -------------------------------------------------------------------------------------

    def generate(self, runtime: ModelRuntime, job: GenerationRequest, names: Mapping[str, str] | None = None,
                 logprobs: int | None = None, prompt_logprobs: bool = False) -> list[Generation]:
        """Validate ``job`` and queue it on the model's continuous batcher (the one every front end
        shares): one Generation per sample. A stream gets a chunk per NNSERVE_STREAM_FLUSH_MS at most; a
        whole answer is woken once, at its end. ``names``: field -> the client's name for it (messages).
        ``logprobs`` / ``prompt_logprobs``: the tokens' log-probabilities with each chunk (and the prompt's),
        as ``ContinuousBatcher.submit_choices`` says."""
        flush = self.settings.stream_flush_ms / 1e3 if job.stream is True else None
        return self._generator(runtime).submit_choices(job, flush, names, logprobs, prompt_logprobs)

    def vocabulary(self, runtime: ModelRuntime) -> Vocabulary:
        """A generating model's tokens: what a prompt of token ids decodes with, and what usage counts."""
        return self._generator(runtime).vocab

    def _generator(self, runtime: ModelRuntime) -> ContinuousBatcher:
        if not runtime.kind_module.generates:
            raise ClientError(f"model {runtime.name!r} is a {runtime.kind} model; it does not generate text")
        return self.repository.generator(runtime)
