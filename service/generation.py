"""Text generation for the char LSTM/GRU models with continuous batching of decode steps.

Every concurrent ``/generate`` request shares one batched ONNX Runtime call per decode step: the
step loop stacks the active requests' last tokens and RNN states along the batch axis, runs the
model once, splits the outputs back and samples one character per request with that request's own
``numpy.random.Generator``. A request joins at the next step boundary (its prompt is prefilled there
in one T>1 call, which also samples its first character) and leaves when it has produced
``max_new_chars`` or its consumer went away. Rows of a batched RNN step do not interact, so a
request's text is the same whether it ran alone or beside others (see docs/generation.md).

BentoML's adaptive batching merges whole requests; it cannot interleave the steps of long-running
streams, which is why this loop is hand-written. It never imports torch.
"""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field, fields

import numpy as np

from service.runtime import ClientError, ModelRuntime

log = logging.getLogger("nnserve.generation")

MAX_PROMPT_CHARS = 2000  # prefilled in one call: bounds that call's time and memory
MAX_NEW_CHARS = 2000  # bounds how long one request holds a batch slot
MAX_LISTED_CHARS = 20  # unknown prompt characters named in an error message
# Prompt characters prefilled per step boundary (at least one request): bounds how long joining
# requests can stall the decode step of those already streaming.
PREFILL_CHARS_PER_STEP = MAX_PROMPT_CHARS


@dataclass
class GenerationRequest:
    """One ``POST /generate`` body. ``seed=None`` draws a random seed (written back by ``generate``)."""

    prompt: str
    max_new_chars: int = 200
    temperature: float = 1.0
    top_k: int | None = None
    seed: int | None = None
    model: str = "char_lstm"
    stream: bool = False

    @classmethod
    def from_dict(cls, body: Mapping) -> GenerationRequest:
        """Build from a JSON object; unknown or missing fields are a ClientError (types: see validate)."""
        if not isinstance(body, Mapping):
            raise ClientError(f"request body must be a JSON object, got {type(body).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(body) - known)
        if unknown:
            raise ClientError(f"unknown field(s) {unknown}; expected some of {sorted(known)}")
        if "prompt" not in body:
            raise ClientError("missing field 'prompt'")
        return cls(**body)

    def validate(self, vocab: str) -> None:
        """Raise ClientError naming the first problem: types, limits, prompt characters outside ``vocab``."""
        if not isinstance(self.prompt, str):
            raise ClientError(f"prompt must be a string, got {type(self.prompt).__name__}")
        if not self.prompt:
            raise ClientError("prompt must not be empty: generation continues from its last character")
        if len(self.prompt) > MAX_PROMPT_CHARS:
            raise ClientError(f"prompt has {len(self.prompt)} characters; the limit is {MAX_PROMPT_CHARS}")
        if not _is_int(self.max_new_chars) or not 1 <= self.max_new_chars <= MAX_NEW_CHARS:
            raise ClientError(f"max_new_chars must be an integer in [1, {MAX_NEW_CHARS}], "
                              f"got {self.max_new_chars!r}")
        if (isinstance(self.temperature, bool) or not isinstance(self.temperature, int | float)
                or not math.isfinite(self.temperature) or self.temperature <= 0):
            raise ClientError(f"temperature must be a finite number > 0, got {self.temperature!r}")
        if self.top_k is not None and (not _is_int(self.top_k) or self.top_k < 1):
            raise ClientError(f"top_k must be an integer >= 1 (or null for no limit), got {self.top_k!r}")
        if self.seed is not None and (not _is_int(self.seed) or self.seed < 0):
            raise ClientError(f"seed must be a non-negative integer (or null for random), got {self.seed!r}")
        if not isinstance(self.model, str):
            raise ClientError(f"model must be a string, got {type(self.model).__name__}")
        if not isinstance(self.stream, bool):
            raise ClientError(f"stream must be true or false, got {self.stream!r}")
        known = set(vocab)
        unknown = list(dict.fromkeys(ch for ch in self.prompt if ch not in known))  # first-seen order
        if unknown:
            listed = ", ".join(f"{ch!r} (U+{ord(ch):04X})" for ch in unknown[:MAX_LISTED_CHARS])
            more = f" and {len(unknown) - MAX_LISTED_CHARS} more" if len(unknown) > MAX_LISTED_CHARS else ""
            raise ClientError(f"prompt contains {len(unknown)} character(s) outside the model vocabulary: "
                              f"{listed}{more}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def sample_token(logits: np.ndarray, temperature: float, top_k: int | None, rng: np.random.Generator) -> int:
    """Sample a token id from one row of logits [V] with temperature and optional top-k.

    Shifting by the max before dividing keeps every positive temperature finite (the best token gets
    exp(0) = 1). All logits equal to the k-th largest are kept, so ties can keep more than k tokens.
    """
    z = (logits.astype(np.float64) - logits.max()) / temperature
    if top_k is not None and top_k < z.size:
        kth = np.partition(z, -top_k)[-top_k]
        z = np.where(z >= kth, z, -np.inf)
    probs = np.exp(z)
    return int(rng.choice(z.size, p=probs / probs.sum()))


class GenerationError(RuntimeError):
    """A server-side failure while generating (a failed model call, shutdown): not the client's fault."""


@dataclass(eq=False)
class _Slot:
    """One request's place in the batch: its own state, sampler and output queue."""

    tokens: np.ndarray  # prompt token ids [T]
    temperature: float
    top_k: int | None
    rng: np.random.Generator
    remaining: int  # characters still to sample
    token: int = -1  # last sampled token, fed to the next decode step
    state: dict[str, np.ndarray] | None = None  # {"h": [L,1,H], "c": ...}; None until prefilled
    out: asyncio.Queue = field(default_factory=asyncio.Queue)  # str per character, then None or an error


class ContinuousBatcher:
    """Decode-step batching for one char_lm runtime. Use ``async for ch in batcher.generate(request)``."""

    def __init__(self, runtime: ModelRuntime, max_batch_size: int = 32,
                 on_step: Callable[[int, float], None] | None = None) -> None:
        if runtime.kind != "char_lm":
            raise ValueError(f"{runtime.tag} is a {runtime.kind!r} model; generation needs a char_lm")
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.runtime, self.max_batch_size, self.on_step = runtime, max_batch_size, on_step
        self.vocab: str = runtime.metadata["vocab"]
        self._index = {ch: i for i, ch in enumerate(self.vocab)}
        self._state_names = [t.name for t in runtime.inputs if t.name != "tokens"]  # h (+ c), as in metadata
        self._waiting: deque[_Slot] = deque()  # submitted, not yet in the batch
        self._active: list[_Slot] = []  # prefilled, decoding
        self._wakeup = asyncio.Event()
        self._loop_task: asyncio.Task | None = None
        self._closed = False

    @property
    def active(self) -> int:
        """Requests holding a batch slot (being decoded)."""
        return len(self._active)

    @property
    def waiting(self) -> int:
        """Requests waiting for the next step boundary (or for a free slot)."""
        return len(self._waiting)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[str]:
        """Yield the sampled characters one by one. Raises ClientError (bad request) before the first
        character, GenerationError if the model call fails. Closing or cancelling the iterator frees the
        request's slot at once (use ``contextlib.aclosing`` so that happens promptly)."""
        request.validate(self.vocab)
        if self._closed:
            raise GenerationError("the generation service is shutting down")
        if request.seed is None:  # written back so the caller can report it and reproduce the text
            request.seed = secrets.randbits(63)
        slot = _Slot(tokens=np.array([self._index[ch] for ch in request.prompt], dtype=np.int64),
                     temperature=float(request.temperature), top_k=request.top_k,
                     rng=np.random.default_rng(request.seed), remaining=request.max_new_chars)
        self._waiting.append(slot)
        self._ensure_loop()
        self._wakeup.set()
        try:
            while True:
                item = await slot.out.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:  # done, failed, closed or cancelled: give the slot back now, not at the next step
            self._drop(slot)

    async def close(self) -> None:
        """Stop the step loop; requests still running end with GenerationError."""
        self._closed = True
        if self._loop_task is not None:
            self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)
            self._loop_task = None
        for slot in [*self._waiting, *self._active]:
            self._finish(slot, GenerationError("the generation service is shutting down"))

    # -- step loop (event-loop side) -------------------------------------------------------------

    def _ensure_loop(self) -> None:
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.get_running_loop().create_task(self._step_loop(), name="generation-steps")

    async def _step_loop(self) -> None:
        while True:
            if not self._waiting and not self._active:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            # Step boundary: admit waiting requests into free slots (FIFO), then run one step.
            joining, prefill_chars = [], 0
            while self._waiting and len(self._active) + len(joining) < self.max_batch_size:
                prompt_chars = self._waiting[0].tokens.size
                if joining and prefill_chars + prompt_chars > PREFILL_CHARS_PER_STEP:
                    break  # the rest join at the next boundary
                joining.append(self._waiting.popleft())
                prefill_chars += prompt_chars
            decoding = list(self._active)
            self._active.extend(joining)
            try:
                # ORT calls block: run them in a worker thread so the server stays responsive.
                prefilled, sampled, seconds = await asyncio.to_thread(self._step, joining, decoding)
                if isinstance(sampled, Exception):  # the batched call failed: fail its rows only
                    sampled = [sampled] * len(decoding)
                elif decoding:
                    self._report_step(len(decoding), seconds)
                for slot, result in zip([*joining, *decoding], [*prefilled, *sampled], strict=True):
                    self._deliver(slot, result)
            except Exception as e:  # a bug here must fail this step's requests, never hang them
                log.exception("generation step for %s failed", self.runtime.tag)
                for slot in [*joining, *decoding]:
                    self._finish(slot, GenerationError(f"generation failed: {type(e).__name__}: {e}"))

    def _deliver(self, slot: _Slot, result: str | Exception) -> None:
        if isinstance(result, Exception):
            self._finish(slot, GenerationError(f"generation failed: {type(result).__name__}: {result}"))
            return
        slot.out.put_nowait(result)
        slot.remaining -= 1
        if slot.remaining <= 0:
            self._finish(slot, None)

    def _finish(self, slot: _Slot, error: Exception | None) -> None:
        self._drop(slot)
        slot.out.put_nowait(error)

    def _drop(self, slot: _Slot) -> None:
        if slot in self._active:
            self._active.remove(slot)
        elif slot in self._waiting:
            self._waiting.remove(slot)

    def _report_step(self, batch_size: int, seconds: float) -> None:
        if self.on_step is None:
            return
        try:
            self.on_step(batch_size, seconds)
        except Exception:  # a metrics bug must not stop generation
            log.exception("on_step callback failed")

    # -- model calls (worker thread) --------------------------------------------------------------

    def _step(self, joining: list[_Slot], decoding: list[_Slot]
              ) -> tuple[list[str | Exception], list[str] | Exception, float]:
        """Prefill each joining request (batch 1, T = prompt length), then one batched decode step for
        the others. Failures come back as values so each fails only the requests it concerns. Each
        slot is touched by one thread at a time: the loop awaits this call."""
        prefilled: list[str | Exception] = []
        for slot in joining:
            try:
                prefilled.append(self._prefill(slot))
            except Exception as e:
                log.exception("prefill for %s failed", self.runtime.tag)
                prefilled.append(e)
        start = time.perf_counter()
        try:
            sampled: list[str] | Exception = self._decode(decoding) if decoding else []
        except Exception as e:
            log.exception("decode step for %s failed (batch of %d)", self.runtime.tag, len(decoding))
            sampled = e
        return prefilled, sampled, time.perf_counter() - start

    def _prefill(self, slot: _Slot) -> str:
        feeds = self.runtime.example_feeds(1)  # zero initial state of the right shape and dtype
        feeds["tokens"] = slot.tokens[None, :]
        out = self.runtime.run(feeds)
        slot.state = {name: out[f"{name}_out"] for name in self._state_names}
        return self._sample(slot, out["logits"][0, -1])

    def _decode(self, batch: list[_Slot]) -> list[str]:
        feeds = {"tokens": np.array([[slot.token] for slot in batch], dtype=np.int64)}
        for name in self._state_names:  # state is [layers, batch, hidden]: stack on axis 1
            feeds[name] = np.concatenate([slot.state[name] for slot in batch], axis=1)
        out = self.runtime.run(feeds)
        chars = []
        for i, slot in enumerate(batch):
            slot.state = {name: out[f"{name}_out"][:, i:i + 1] for name in self._state_names}
            chars.append(self._sample(slot, out["logits"][i, -1]))
        return chars

    def _sample(self, slot: _Slot, logits: np.ndarray) -> str:
        slot.token = sample_token(logits, slot.temperature, slot.top_k, slot.rng)
        return self.vocab[slot.token]
