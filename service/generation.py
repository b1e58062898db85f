"""Text generation for the char LSTM/GRU models with continuous batching of decode steps.

Every concurrent ``/generate`` request shares one batched ONNX Runtime call per decode step. The step
loop runs on its own thread and sleeps until there is work (no thread hop per step): it stacks the
active requests' last tokens and RNN states along the batch axis, runs the model once, and samples
one character per request in one vectorised pass, each row with a uniform draw from that request's
own ``numpy.random.Generator``. A request joins at the next step boundary: the prompts of joining
requests are prefilled there, those of equal length together in one [B, T] call (an RNN cannot pad
without changing the state), which also samples their first character. It leaves when it has its
``max_new_chars`` or its reader went away. Rows of a batched step do not interact, so a request's
text is the same alone or beside others (see docs/generation.md).

A request for ``n`` samples of one prompt takes n slots that join together: its prompt is prefilled
once and the resulting state copied into each slot; sample i draws from its own generator seeded
``seed + i``, so it is exactly the text of a one-sample request with that seed.

``temperature`` 0 is greedy decoding (the likeliest token each step), as OpenAI's and Hugging Face's clients
assume: it runs as top_k 1. A reader that asks for log-probabilities (``submit_choices(logprobs=k)``) gets,
with each chunk, every token's log-probability and the k likeliest alternatives under the model's own
distribution (before temperature, top_k and top_p), computed in the same step, only for the rows that ask.

Characters reach the event loop in batches: each request has a buffer the step thread appends to,
and its reader is woken at most once until it has taken what is there, so a stream sends every
character that is ready in one chunk, however fast the model runs.

Hand-written: BentoML's batching merges whole requests; it cannot interleave the steps of
long-running streams. This module never imports torch.
"""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
import threading
import time
from collections import deque
from collections.abc import AsyncGenerator, Callable, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, fields

import numpy as np

from models.kinds.sequence_lm import vocabulary
from models.vocab import Vocabulary
from service.errors import ClientError
from service.runtime import ModelRuntime

log = logging.getLogger("nnserve.generation")

MAX_PROMPT_CHARS = 2000  # prefilled in one call: bounds that call's time and memory
# Characters one request may ask for in all (n x max_new_chars): bounds how long it holds its batch slots.
# A JSON answer sends nothing until its last character (a proxy's read timeout, often 60 s, or a drain cuts it
# with nothing delivered); a stream delivers from its first character, so it may ask for more.
MAX_NEW_CHARS = 2000
MAX_STREAM_CHARS = 10_000
MAX_N = 16  # samples of one prompt (n): each takes a batch slot, and all n must fit in the batch at once
MAX_LISTED_CHARS = 20  # unknown prompt characters named in an error message
MAX_STOPS = 4  # stop strings per request (OpenAI's limit): each chunk is searched for every one
MAX_STOP_CHARS = 100
MAX_LOGPROBS = 20  # alternatives listed per token (OpenAI's top_logprobs limit)
# Prompt characters prefilled per step boundary (at least one request): bounds how long joining
# requests can stall the decode step of those already streaming.
PREFILL_CHARS_PER_STEP = MAX_PROMPT_CHARS


@dataclass
class GenerationRequest:
    """One ``POST /generate`` body. ``seed=None`` draws a random seed (written back by ``generate``)."""

    prompt: str
    max_new_chars: int = 200
    temperature: float = 1.0  # 0 = greedy
    top_k: int | None = None
    top_p: float | None = None  # nucleus sampling: the likeliest tokens holding this much probability
    seed: int | None = None
    stop: str | list[str] | None = None  # the text ends before the first of these (finish reason "stop")
    model: str = "char_lstm"
    version: str = ""  # a served version of the model; "" = its traffic split, else its newest
    stream: bool = False
    n: int = 1  # samples of the prompt, decoded together; sample i is seeded seed + i

    @classmethod
    def from_dict(cls, body: Mapping) -> GenerationRequest:
        """Build from a JSON object; unknown or missing fields are a ClientError (types: see validate)."""
        if not isinstance(body, Mapping):
            raise ClientError(f"request body must be a JSON object, got {type(body).__name__}")
        known = {f.name for f in fields(cls)}
        if not all(isinstance(key, str) for key in body):  # JSON keys always are; other callers may differ
            raise ClientError("field names must be strings")
        unknown = sorted(set(body) - known)
        if unknown:
            raise ClientError(f"unknown field(s) {[u[:50] for u in unknown[:5]]}; expected some of {sorted(known)}")
        if "prompt" not in body:
            raise ClientError("missing field 'prompt'")
        return cls(**body)

    def validate(self, vocab: Vocabulary, names: Mapping[str, str] | None = None) -> None:
        """Raise ClientError naming the first problem: types, limits, prompt characters outside ``vocab``.
        ``names``: field -> the name the client used for it (Triton's ``max_tokens`` for ``max_new_chars``),
        so the message names what the client sent. ``stop`` becomes a list."""
        self._check_types(vocab, names or {})
        unknown = vocab.unknown(self.prompt)
        if unknown:
            listed = ", ".join(f"{ch!r} (U+{ord(ch):04X})" if len(ch) == 1 else repr(ch[:50])
                               for ch in unknown[:MAX_LISTED_CHARS])
            more = f" and {len(unknown) - MAX_LISTED_CHARS} more" if len(unknown) > MAX_LISTED_CHARS else ""
            what = "character(s)" if vocab.is_chars else "piece(s)"
            raise ClientError(f"prompt contains {len(unknown)} {what} outside the model vocabulary: {listed}{more}")

    def stops(self) -> list[str]:
        """The stop strings as a list (after validate)."""
        return [] if self.stop is None else [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def char_limit(self) -> int:
        """The characters this request may ask for in all (n x max_new_chars)."""
        return MAX_STREAM_CHARS if self.stream is True else MAX_NEW_CHARS

    def choice_seeds(self) -> list[int]:
        """Each sample's seed (after ``seed`` is set): sample i = a one-sample request with seed + i."""
        assert self.seed is not None, "choice_seeds before the seed is set"
        return [self.seed + i for i in range(self.n)]

    def _check_types(self, vocab: Vocabulary, names: Mapping[str, str]) -> None:
        def name(field_name: str) -> str:
            return names.get(field_name, field_name)

        if not isinstance(self.stream, bool):  # first: the limits below depend on it
            raise ClientError(f"stream must be true or false, got {_show(self.stream)}")
        limit = self.char_limit()
        streamed = "" if self.stream else f" ({MAX_STREAM_CHARS} when streamed)"
        if not isinstance(self.prompt, str):
            raise ClientError(f"{name('prompt')} must be a string, got {type(self.prompt).__name__}")
        if not self.prompt:
            raise ClientError(f"{name('prompt')} must not be empty: generation continues from its last character")
        if len(self.prompt) > MAX_PROMPT_CHARS:
            raise ClientError(f"{name('prompt')} has {len(self.prompt)} characters; the limit is {MAX_PROMPT_CHARS}")
        if not _is_int(self.max_new_chars) or not 1 <= self.max_new_chars <= limit:
            raise ClientError(f"{name('max_new_chars')} must be an integer in [1, {limit}]{streamed}, "
                              f"got {_show(self.max_new_chars)}")
        if not _is_int(self.n) or not 1 <= self.n <= MAX_N:
            raise ClientError(f"{name('n')} must be an integer in [1, {MAX_N}], got {_show(self.n)}")
        if self.n * self.max_new_chars > limit:
            raise ClientError(f"{name('n')} x {name('max_new_chars')} = {self.n} x {self.max_new_chars} = "
                              f"{self.n * self.max_new_chars} characters; the limit is {limit} per request{streamed}")
        if (isinstance(self.temperature, bool) or not isinstance(self.temperature, int | float)
                or not _finite(self.temperature) or self.temperature < 0):
            raise ClientError(f"{name('temperature')} must be a finite number >= 0 (0 = greedy), "
                              f"got {_show(self.temperature)}")
        if self.top_k is not None and (not _is_int(self.top_k) or self.top_k < 1):
            raise ClientError(f"{name('top_k')} must be an integer >= 1 (or null for no limit), "
                              f"got {_show(self.top_k)}")
        if self.top_k is not None:
            # More than the vocabulary means all of it; clamped here because the step loop keeps top_k in an
            # int64 array, where a huge JSON integer would overflow mid-step and fail the whole batch.
            self.top_k = min(self.top_k, len(vocab))
        if self.top_p is not None and (isinstance(self.top_p, bool) or not isinstance(self.top_p, int | float)
                                       or not _finite(self.top_p) or not 0 < self.top_p <= 1):
            raise ClientError(f"{name('top_p')} must be a number in (0, 1] (or null for no limit), "
                              f"got {_show(self.top_p)}")
        if self.seed is not None and (not _is_int(self.seed) or self.seed < 0):
            raise ClientError(f"{name('seed')} must be a non-negative integer (or null for random), "
                              f"got {_show(self.seed)}")
        stops = [self.stop] if isinstance(self.stop, str) else self.stop
        if stops is not None and (not isinstance(stops, list) or not 1 <= len(stops) <= MAX_STOPS or not all(
                isinstance(x, str) and 1 <= len(x) <= MAX_STOP_CHARS for x in stops)):
            raise ClientError(f"{name('stop')} must be a string or a list of 1 to {MAX_STOPS} strings, each of 1 to "
                              f"{MAX_STOP_CHARS} characters (or null), got {_show(self.stop)}")
        if not isinstance(self.model, str):
            raise ClientError(f"model must be a string, got {type(self.model).__name__}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _show(value: object) -> str:
    """A bad value for an error message: short, and safe for integers too long to print."""
    try:
        text = repr(value)
    except ValueError:  # int -> str refuses more than sys.get_int_max_str_digits() digits
        text = "an integer with thousands of digits"
    return text if len(text) <= 60 else text[:57] + "..."


def _finite(value: int | float) -> bool:
    """math.isfinite, except that an integer too large for a float is not finite (rather than an
    OverflowError: JSON integers have no size limit)."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def sample_tokens(logits: np.ndarray, temperatures: np.ndarray, top_ks: np.ndarray,
                  uniforms: np.ndarray, top_ps: np.ndarray | None = None) -> np.ndarray:
    """One token id per row of ``logits`` [B, V]: softmax(logits / temperature) restricted to the row's
    ``top_k`` likeliest tokens (0 = all; ties at the k-th value are all kept), then to the row's nucleus
    (``top_ps``, 1 = all: the fewest likeliest tokens whose probability reaches top_p, ties kept), sampled
    by inverse CDF with the row's uniform draw in [0, 1). Row-wise arithmetic only, so a row's token does
    not depend on the other rows of the batch.

    Shifting by the row max before dividing keeps every positive temperature finite (the best token
    gets exp(0) = 1)."""
    z = (logits.astype(np.float64) - logits.max(axis=1, keepdims=True)) / temperatures[:, None]
    vocab = z.shape[1]
    limited = (top_ks > 0) & (top_ks < vocab)
    if limited.any():
        descending = -np.sort(-z[limited], axis=1)
        kth = descending[np.arange(descending.shape[0]), top_ks[limited] - 1]
        z[limited] = np.where(z[limited] >= kth[:, None], z[limited], -np.inf)
    nucleus = top_ps < 1.0 if top_ps is not None else np.zeros(len(z), dtype=bool)
    if top_ps is not None and nucleus.any():
        p = np.exp(z[nucleus])  # after top_k: the nucleus is taken from what top_k left
        descending = -np.sort(-p, axis=1)
        reached = np.cumsum(descending, axis=1) / descending.sum(axis=1, keepdims=True)
        # Tokens needed: those before the cumulative probability reaches top_p, plus the one that reaches it.
        needed = np.minimum((reached < top_ps[nucleus][:, None]).sum(axis=1) + 1, vocab)
        smallest = descending[np.arange(descending.shape[0]), needed - 1]
        z[nucleus] = np.where(p >= smallest[:, None], z[nucleus], -np.inf)
    cdf = np.cumsum(np.exp(z), axis=1)
    tokens = (cdf <= (uniforms * cdf[:, -1])[:, None]).sum(axis=1)
    # u * total can round up to total: fall back to the last token with probability > 0.
    last = vocab - 1 - np.argmax(np.isfinite(z[:, ::-1]), axis=1)
    return np.minimum(tokens, last)


def sample_token(logits: np.ndarray, temperature: float, top_k: int | None, rng: np.random.Generator,
                 top_p: float | None = None) -> int:
    """``sample_tokens`` for one row of logits [V] and one request's generator."""
    return int(sample_tokens(logits[None], np.array([temperature], dtype=np.float64),
                             np.array([top_k or 0], dtype=np.int64), np.array([rng.random()]),
                             np.array([1.0 if top_p is None else top_p], dtype=np.float64))[0])


@dataclass(frozen=True)
class TokenLogprob:
    """One token of a text with its log-probability under the model (natural log, before temperature, top_k
    and top_p) and the likeliest alternatives at its position, likeliest first. ``logprob`` is None for a
    prompt's first token (nothing precedes it)."""

    token: str
    logprob: float | None
    top: tuple[tuple[str, float], ...] = ()


def token_logprobs(logits: np.ndarray, chosen: np.ndarray, k: int, vocab: Vocabulary) -> list[TokenLogprob]:
    """A TokenLogprob per row of ``logits`` [B, V] for the row's ``chosen`` token id, with its ``k`` likeliest
    alternatives (ties: the lower id first)."""
    z = logits.astype(np.float64)
    z = z - z.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    k = min(k, logp.shape[1])
    best = np.argsort(-logp, axis=1, kind="stable")[:, :k]
    return [TokenLogprob(vocab.piece(int(token)), float(row[token]),
                         tuple((vocab.piece(int(i)), float(row[i])) for i in ids))
            for row, token, ids in zip(logp, chosen, best, strict=True)]


class GenerationError(RuntimeError):
    """A server-side failure while generating (a failed model call, shutdown): not the client's fault."""


@dataclass(eq=False)
class _Slot:
    """One request: its place in the batch, its state and sampler, and the characters not yet read."""

    tokens: np.ndarray  # prompt token ids [T]
    temperature: float
    top_k: int  # 0 = no limit
    rng: np.random.Generator
    remaining: int  # characters still to sample
    loop: asyncio.AbstractEventLoop
    ready: asyncio.Event = field(default_factory=asyncio.Event)  # set (on the loop) when there is news
    token: int = -1  # last sampled token, fed to the next decode step
    state: dict[str, np.ndarray] | None = None  # {"h": [L,1,H], "c": ...}; None until prefilled
    buffer: list[str] = field(default_factory=list)  # sampled, not yet read
    finished: bool = False
    error: Exception | None = None
    notified: bool = False  # a wake-up is on its way to the reader
    cancelled: bool = False
    wake_each_step: bool = True  # False: the reader wants the whole text, woken once when it is finished
    top_p: float = 1.0  # 1 = no nucleus limit
    stops: list[str] = field(default_factory=list)
    finish_reason: str | None = None  # "length" or "stop" once the reader has the whole text
    # The n slots of one request (the same list object in each; None alone): they join the batch together
    # and share one prefill of their prompt.
    siblings: list[_Slot] | None = None
    logprobs: int = -1  # alternatives to record per sampled token; -1 = record nothing
    scores: list[TokenLogprob] = field(default_factory=list)  # parallel to buffer when logprobs >= 0
    sampled_score: TokenLogprob | None = None  # this step's, until delivered
    prompt_scores: list[TokenLogprob] | None = None  # the prompt's tokens, when asked for (after prefill)
    chunk_scores: list[TokenLogprob] = field(default_factory=list)  # the tokens of the chunk last handed out

    def prefilled_state(self) -> dict[str, np.ndarray]:
        assert self.state is not None, "a slot decodes only after its prefill"
        return self.state


class Generation:
    """The chunks of one submitted request (an async iterator of str) and, once the last chunk has been
    handed out, why the text ended: ``finish_reason`` "length" (max_new_chars reached) or "stop" (a stop
    string was met; the text ends before it). ``finish_reason`` is set before the last chunk is yielded, so
    a reader knows a chunk is the last one. ``aclose()`` frees the request's batch slot at once."""

    def __init__(self, chunks: AsyncGenerator[str, None], slot: _Slot) -> None:
        self._chunks, self._slot = chunks, slot

    def __aiter__(self) -> Generation:
        return self

    async def __anext__(self) -> str:
        return await self._chunks.__anext__()

    async def aclose(self) -> None:
        await self._chunks.aclose()

    @property
    def finish_reason(self) -> str | None:
        return self._slot.finish_reason

    @property
    def logprobs(self) -> list[TokenLogprob]:
        """The tokens of the chunk last handed out with their log-probabilities (submitted with ``logprobs``;
        else empty). A stop string cutting a multi-character token keeps that token here."""
        return self._slot.chunk_scores

    @property
    def prompt_logprobs(self) -> list[TokenLogprob] | None:
        """The prompt's tokens with their log-probabilities (submitted with ``prompt_logprobs``), once the
        first chunk has been handed out."""
        return self._slot.prompt_scores


@dataclass(frozen=True, slots=True)
class Chunk:
    """A chunk of one sample of a request (``read_chunks``): its text, its finish_reason on the sample's last
    chunk, and its tokens' log-probabilities (empty unless submitted with ``logprobs``)."""

    index: int
    text: str
    finish_reason: str | None
    logprobs: list[TokenLogprob]


def read_choices(generations: list[Generation]) -> AsyncGenerator[tuple[int, str, str | None], None]:
    """(choice index, text, finish_reason) per chunk of the samples of one request, in the order the chunks
    are ready: finish_reason is None but on each choice's last chunk, which is ("", reason) when its text
    ended without a chunk known to be the last (a stop string right at a chunk's start). The first failure
    ends them all. Closing this iterator closes every Generation (frees every slot). Use with
    contextlib.aclosing."""
    return _merged(generations, scored=False)


def read_chunks(generations: list[Generation]) -> AsyncGenerator[Chunk, None]:
    """``read_choices`` with each chunk's log-probabilities: a Chunk per chunk."""
    return _merged(generations, scored=True)


async def _merged(generations: list[Generation], scored: bool) -> AsyncGenerator:
    def item(index: int, text: str, reason: str | None, generation: Generation | None) -> tuple | Chunk:
        if not scored:
            return index, text, reason
        return Chunk(index, text, reason, list(generation.logprobs) if generation is not None else [])

    if len(generations) == 1:  # no task per choice for the common case
        generation, reason = generations[0], None
        try:
            async for text in generation:
                reason = generation.finish_reason
                yield item(0, text, reason, generation)
            if reason is None:
                yield item(0, "", generation.finish_reason or "length", None)
        finally:
            await generation.aclose()
        return
    # A bounded queue: a choice's reader waits while its last chunk is unread, so what its slot samples
    # meanwhile gathers into one chunk, as for one sample.
    queue: asyncio.Queue[tuple | Chunk | BaseException] = asyncio.Queue(maxsize=len(generations))

    async def pump(index: int, generation: Generation) -> None:
        reason = None
        try:
            async for text in generation:
                reason = generation.finish_reason
                await queue.put(item(index, text, reason, generation))
            if reason is None:
                await queue.put(item(index, "", generation.finish_reason or "length", None))
        except Exception as e:
            await queue.put(e)

    tasks = [asyncio.create_task(pump(i, g)) for i, g in enumerate(generations)]
    try:
        left = len(generations)
        while left:
            got = await queue.get()
            if isinstance(got, BaseException):
                raise got
            left -= (got.finish_reason if isinstance(got, Chunk) else got[2]) is not None
            yield got
    finally:  # done, failed or abandoned: stop every reader, then close every generation (frees its slot)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for generation in generations:
            await generation.aclose()


class ContinuousBatcher:
    """Decode-step batching for one sequence_lm runtime::

        stream = batcher.submit(request)  # validates (ClientError) and queues it
        async for chunk in stream: ...    # str chunks: every character sampled since the last one

    Closing the iterator (or cancelling its task) frees the request's slot at once."""

    def __init__(self, runtime: ModelRuntime, max_batch_size: int = 32,
                 on_step: Callable[[int, float], None] | None = None,
                 on_occupancy: Callable[[int, int], None] | None = None) -> None:
        if not runtime.kind_module.generates:
            raise ValueError(f"{runtime.tag} is a {runtime.kind!r} model; it does not generate text")
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.runtime, self.max_batch_size, self.on_step = runtime, max_batch_size, on_step
        self.on_occupancy = on_occupancy  # (active, waiting) whenever either changes: the metrics gauges
        self._reported = (0, 0)
        self._bind(runtime)
        self._waiting: deque[_Slot] = deque()  # submitted, not yet in the batch
        self._active: list[_Slot] = []  # prefilled, decoding
        self._lock = threading.Condition()
        self._holds = 0
        self._closed = False
        self._thread = threading.Thread(target=self._step_loop, name=f"generation-{runtime.name}", daemon=True)
        self._thread.start()

    @property
    def active(self) -> int:
        """Requests holding a batch slot (being decoded)."""
        return len(self._active)

    @property
    def waiting(self) -> int:
        """Requests waiting for the next step boundary (or for a free slot)."""
        return len(self._waiting)

    def submit(self, request: GenerationRequest, flush_interval_s: float | None = 0.0,
               names: Mapping[str, str] | None = None) -> Generation:
        """Validate and queue a one-sample ``request`` (call on the event loop that will read it). Raises
        ClientError for a bad request, GenerationError once closed. ``request.seed`` is set if it was None.

        ``flush_interval_s``: the reader gets the first characters at once, then at most one chunk per
        interval (everything sampled meanwhile: one event-loop wake-up and one write instead of one per
        character); 0 = as soon as each step is done; None = the whole text in one chunk at the end.
        With stop strings a None interval still gives several chunks (each step is searched for them, so the
        request ends at a stop): join them. ``names``: see GenerationRequest.validate. ``n`` > 1: use
        submit_choices."""
        request.validate(self.vocab, names)
        if request.n != 1:
            raise ValueError(f"submit takes one sample; use submit_choices for n={request.n}")
        return self.submit_choices(request, flush_interval_s, names)[0]

    def submit_choices(self, request: GenerationRequest, flush_interval_s: float | None = 0.0,
                       names: Mapping[str, str] | None = None, logprobs: int | None = None,
                       prompt_logprobs: bool = False) -> list[Generation]:
        """``submit`` for ``request.n`` samples of one prompt: one Generation per sample, sample i seeded
        ``seed + i``. The n slots join the batch at one step boundary (they wait until n slots are free) and
        their prompt is prefilled once. Read them with ``read_choices``; closing every Generation frees
        every slot.

        ``logprobs`` k (0 to MAX_LOGPROBS): each chunk comes with its tokens' log-probabilities and their k
        likeliest alternatives (``Generation.logprobs``, ``read_chunks``); ``prompt_logprobs``: those of the
        prompt's tokens too (``Generation.prompt_logprobs``)."""
        request.validate(self.vocab, names)
        if logprobs is not None and not (_is_int(logprobs) and 0 <= logprobs <= MAX_LOGPROBS):
            raise ClientError(f"logprobs must be an integer in [0, {MAX_LOGPROBS}], got {_show(logprobs)}")
        if request.n > self.max_batch_size:
            raise ClientError(f"{(names or {}).get('n', 'n')} is {request.n}; this server decodes at most "
                              f"{self.max_batch_size} sequences together (NNSERVE_GENERATION_BATCH_SIZE)")
        if request.seed is None:  # written back so the caller can report it and reproduce the text
            request.seed = secrets.randbits(63)
        stops, loop = request.stops(), asyncio.get_running_loop()
        tokens = np.array(self.vocab.encode(request.prompt), dtype=np.int64)
        greedy = request.temperature == 0  # the likeliest token: top_k 1 (any positive temperature)
        slots = [_Slot(tokens=tokens, temperature=1.0 if greedy else float(request.temperature),
                       top_k=1 if greedy else request.top_k or 0,
                       rng=np.random.default_rng(seed), remaining=request.max_new_chars, loop=loop,
                       # With stop strings the reader must look at every step, to end the request at a stop.
                       wake_each_step=flush_interval_s is not None or bool(stops),
                       top_p=1.0 if request.top_p is None else float(request.top_p), stops=stops,
                       logprobs=-1 if logprobs is None else logprobs,
                       prompt_scores=[] if prompt_logprobs else None)
                 for seed in request.choice_seeds()]
        if len(slots) > 1:
            for slot in slots:
                slot.siblings = slots
        with self._lock:
            if self._closed:
                raise GenerationError("the generation service is shutting down")
            self._waiting.extend(slots)
            self._lock.notify()
            self._report_occupancy()
        return [Generation(self._read(slot, flush_interval_s or 0.0), slot) for slot in slots]

    @contextmanager
    def held(self):
        """No step starts while held: requests submitted inside join at the same step boundary (tests)."""
        with self._lock:
            self._holds += 1
        try:
            yield self
        finally:
            with self._lock:
                self._holds -= 1
                self._lock.notify()

    async def close(self) -> None:
        """Stop the step loop; requests still running end with GenerationError."""
        with self._lock:
            self._closed = True
            slots = [*self._waiting, *self._active]
            self._waiting.clear()
            self._active.clear()
            self._report_occupancy()
            self._lock.notify_all()
        await asyncio.to_thread(self._thread.join)
        self._finish(slots, GenerationError("the generation service is shutting down"))

    # -- reader side (event loop) -----------------------------------------------------------------------

    async def _read(self, slot: _Slot, flush_interval_s: float) -> AsyncGenerator[str, None]:
        held = ""  # the end of the text so far that may be the start of a stop string: not sent yet
        # Log-probabilities (when asked for): of the tokens received, those not handed out with a chunk yet.
        scores: deque[TokenLogprob] = deque()
        sent = scored = 0  # characters handed out; characters of the tokens handed out with them
        try:
            while True:
                slot.ready.clear()
                with self._lock:
                    text = "".join(slot.buffer)
                    slot.buffer.clear()
                    scores.extend(slot.scores)
                    slot.scores.clear()
                    slot.notified = False
                    finished, error = slot.finished, slot.error
                if slot.stops and (text or finished):
                    text, held, stopped = _cut_at_stop(held + text, slot.stops, finished)
                    if stopped:
                        slot.finish_reason = "stop"  # before the last chunk: its reader knows it is the last
                        if text:
                            if slot.logprobs >= 0:
                                sent, scored = _hand_out(slot, scores, sent + len(text), scored, cut=True)
                            yield text
                        return
                if finished and error is None:
                    slot.finish_reason = "length"
                if text:
                    if slot.logprobs >= 0:
                        sent, scored = _hand_out(slot, scores, sent + len(text), scored, cut=False)
                    yield text
                    if flush_interval_s and not finished:  # let the next characters gather meanwhile
                        await asyncio.sleep(flush_interval_s)
                elif finished:
                    if error is not None:
                        raise error
                    return
                else:
                    await slot.ready.wait()
        finally:  # done, failed, closed or cancelled: give the slot back now, not at the next step
            with self._lock:
                slot.cancelled = True
                if slot in self._active:
                    self._active.remove(slot)
                elif slot in self._waiting:
                    self._waiting.remove(slot)
                self._report_occupancy()

    # -- step loop (its own thread) ---------------------------------------------------------------------

    def _step_loop(self) -> None:
        while True:
            with self._lock:
                while not self._closed and (self._holds or not (self._waiting or self._active)):
                    self._lock.wait()
                if self._closed:
                    return
                joining = self._admit()
                decoding = list(self._active)
                self._active.extend(joining)
                self._report_occupancy()
            try:
                self._step(joining, decoding)
            except Exception as e:  # a bug here must fail this step's requests, never hang them
                log.exception("generation step for %s failed", self.runtime.tag)
                self._finish([*joining, *decoding], GenerationError(f"generation failed: {type(e).__name__}: {e}"))

    def _admit(self) -> list[_Slot]:
        """Waiting requests that join at this boundary: FIFO into free slots, within the prefill budget. The
        samples of one request join together (those still wanted), or wait for enough free slots."""
        joining: list[_Slot] = []
        prefill_chars = 0
        while self._waiting:
            head = self._waiting[0]
            # Siblings not cancelled are all still waiting: a reader leaving removes its slot at once.
            members = [head] if head.siblings is None else [s for s in head.siblings if not s.cancelled]
            if len(self._active) + len(joining) + len(members) > self.max_batch_size:
                break  # FIFO: nobody overtakes a request waiting for its slots
            prompt_chars = head.tokens.size  # prefilled once for all its samples
            if joining and prefill_chars + prompt_chars > PREFILL_CHARS_PER_STEP:
                break  # the rest join at the next boundary
            for slot in members:
                self._waiting.remove(slot)
            joining.extend(members)
            prefill_chars += prompt_chars
        return joining

    def _step(self, joining: list[_Slot], decoding: list[_Slot]) -> None:
        """Prefill the joining requests (equal prompt lengths together), then one batched decode step for
        the others. A failed call fails only the requests it concerns."""
        results: list[tuple[list[_Slot], np.ndarray | Exception]] = []
        by_length: dict[int, list[_Slot]] = {}
        for slot in joining:
            by_length.setdefault(slot.tokens.size, []).append(slot)
        for group in by_length.values():
            try:
                results.append((group, self._prefill(group)))
            except Exception as e:
                log.exception("prefill of %d request(s) for %s failed", len(group), self.runtime.tag)
                results.append((group, e))
        if decoding:
            start = time.perf_counter()
            try:
                results.append((decoding, self._decode(decoding)))
                self._report_step(len(decoding), time.perf_counter() - start)
            except Exception as e:
                log.exception("decode step for %s failed (batch of %d)", self.runtime.tag, len(decoding))
                results.append((decoding, e))
        self._deliver(results)

    def _bind(self, runtime: ModelRuntime) -> None:
        """The tensor names and vocabulary of the model's metadata (models/kinds/sequence_lm.py)."""
        self.runtime, self.vocab = runtime, vocabulary(runtime.metadata)
        self._tokens, self._scores = runtime.roles["tokens"], runtime.roles["scores"]
        self._state = [(name, out, runtime.batch_axis(name)) for name, out in runtime.roles["state"]]
        self._probabilities = runtime.metadata.get("scores") == "probabilities"  # sampled from their log

    def _prefill(self, group: list[_Slot]) -> np.ndarray:
        """One [B, T] call for the group's distinct prompts: the samples of one request share a row (its state
        is copied into each of their slots, and each samples its first character from it)."""
        rows: list[int] = []
        prompts: list[np.ndarray] = []
        row_of: dict[int, int] = {}
        for slot in group:
            key = id(slot.siblings) if slot.siblings is not None else id(slot)
            if key not in row_of:
                row_of[key] = len(prompts)
                prompts.append(slot.tokens)
            rows.append(row_of[key])
        feeds = self.runtime.example_feeds(len(prompts))  # zero initial state of the right shape and dtype
        feeds[self._tokens] = np.stack(prompts)
        return self._run(group, feeds, rows)

    def _decode(self, batch: list[_Slot]) -> np.ndarray:
        feeds = {self._tokens: np.array([[slot.token] for slot in batch], dtype=np.int64)}
        for name, _, axis in self._state:  # the state's batch axis (1: [layers, batch, hidden])
            feeds[name] = np.concatenate([slot.prefilled_state()[name] for slot in batch], axis=axis)
        return self._run(batch, feeds)

    def _run(self, batch: list[_Slot], feeds: dict[str, np.ndarray], rows: list[int] | None = None) -> np.ndarray:
        """Run the model; slot k takes output row ``rows[k]`` (default k). np.take copies: every slot owns its
        state, also those that share a row."""
        out = self.runtime.run(feeds)
        prefill = rows is not None
        rows = list(range(len(batch))) if rows is None else rows
        for slot, row in zip(batch, rows, strict=True):
            slot.state = {name: np.take(out[out_name], [row], axis=axis) for name, out_name, axis in self._state}
        everything = out[self._scores]
        if prefill:  # the prompt's own log-probabilities for those that ask
            for slot, row in zip(batch, rows, strict=True):
                if slot.prompt_scores is not None and not slot.prompt_scores:
                    self._score_prompt(slot, everything[row])
        scores = everything[:, -1][rows]
        return self._sample(batch, self._logits(scores))

    def _logits(self, scores: np.ndarray) -> np.ndarray:
        return np.log(np.maximum(scores, 1e-30)) if self._probabilities else scores

    def _score_prompt(self, slot: _Slot, scores: np.ndarray) -> None:
        """The prompt's tokens with their log-probabilities (``scores`` [T, V]: the prediction after each)."""
        first = TokenLogprob(self.vocab.piece(int(slot.tokens[0])), None)
        later = (token_logprobs(self._logits(scores[:-1]), slot.tokens[1:], max(slot.logprobs, 0), self.vocab)
                 if slot.tokens.size > 1 else [])
        slot.prompt_scores = [first, *later]

    def _sample(self, batch: list[_Slot], logits: np.ndarray) -> np.ndarray:
        tokens = sample_tokens(logits, np.array([s.temperature for s in batch], dtype=np.float64),
                               np.array([s.top_k for s in batch], dtype=np.int64),
                               np.array([s.rng.random() for s in batch]),
                               np.array([s.top_p for s in batch], dtype=np.float64))
        for slot, token in zip(batch, tokens, strict=True):
            slot.token = int(token)
        wanted = [i for i, slot in enumerate(batch) if slot.logprobs >= 0]
        if wanted:  # only the rows that ask pay for it
            k = max(batch[i].logprobs for i in wanted)
            for i, score in zip(wanted, token_logprobs(logits[wanted], tokens[wanted], k, self.vocab), strict=True):
                batch[i].sampled_score = TokenLogprob(score.token, score.logprob, score.top[:batch[i].logprobs])
        return tokens

    def _deliver(self, results: list[tuple[list[_Slot], np.ndarray | Exception]]) -> None:
        """Hand the step's characters (or errors) to the readers; requests that are done leave the batch."""
        wake: list[_Slot] = []
        with self._lock:
            for slots, outcome in results:
                for i, slot in enumerate(slots):
                    if slot.cancelled or slot.finished:
                        continue
                    if isinstance(outcome, Exception):
                        slot.error = GenerationError(f"generation failed: {type(outcome).__name__}: {outcome}")
                        slot.finished = True
                    else:
                        slot.buffer.append(self.vocab.piece(int(outcome[i])))
                        if slot.sampled_score is not None:
                            slot.scores.append(slot.sampled_score)
                            slot.sampled_score = None
                        slot.remaining -= 1
                        slot.finished = slot.remaining <= 0
                    if slot.finished and slot in self._active:
                        self._active.remove(slot)
                    if not slot.notified and (slot.wake_each_step or slot.finished):
                        slot.notified = True
                        wake.append(slot)
            self._report_occupancy()
        _wake(wake)

    def _finish(self, slots: list[_Slot], error: Exception) -> None:
        with self._lock:
            for slot in slots:
                if slot in self._active:
                    self._active.remove(slot)
                if not slot.finished:
                    slot.finished, slot.error = True, error
                slot.notified = True
        _wake(slots)

    def _report_occupancy(self) -> None:
        """Tell on_occupancy the active and waiting counts if they changed (call holding the lock)."""
        now = (len(self._active), len(self._waiting))
        if self.on_occupancy is None or now == self._reported:
            return
        self._reported = now
        try:
            self.on_occupancy(*now)
        except Exception:  # a metrics bug must not stop generation
            log.exception("on_occupancy callback failed")

    def _report_step(self, batch_size: int, seconds: float) -> None:
        if self.on_step is None:
            return
        try:
            self.on_step(batch_size, seconds)
        except Exception:  # a metrics bug must not stop generation
            log.exception("on_step callback failed")


def _hand_out(slot: _Slot, scores: deque[TokenLogprob], sent: int, scored: int, cut: bool) -> tuple[int, int]:
    """Move to ``slot.chunk_scores`` the tokens that the characters sent so far (``sent``) cover; ``cut``: the
    text ended inside a token (a stop string), which is then included. Returns (sent, scored)."""
    chunk = []
    while scores and (scored + len(scores[0].token) <= sent or (cut and scored < sent)):
        token = scores.popleft()
        scored += len(token.token)
        chunk.append(token)
    slot.chunk_scores = chunk
    return sent, scored


def _cut_at_stop(text: str, stops: list[str], finished: bool) -> tuple[str, str, bool]:
    """(text to send, text held back, whether a stop string was met) for the unsent ``text``: the text before
    the earliest stop string; else all but the longest end that could still become one (all when finished)."""
    found = [i for i in (text.find(stop) for stop in stops) if i >= 0]
    if found:
        return text[:min(found)], "", True
    if finished:
        return text, "", False
    keep = max((k for stop in stops for k in range(1, min(len(stop), len(text) + 1))
                if text.endswith(stop[:k])), default=0)
    return text[:len(text) - keep], text[len(text) - keep:], False


def _wake(slots: list[_Slot]) -> None:
    """Set each reader's event on its own loop: one thread-safe call per loop, not per request."""
    by_loop: dict[asyncio.AbstractEventLoop, list[_Slot]] = {}
    for slot in slots:
        by_loop.setdefault(slot.loop, []).append(slot)
    for loop, group in by_loop.items():
        try:
            loop.call_soon_threadsafe(_set_ready, group)
        except RuntimeError:  # the loop is closed: nobody reads any more
            pass


def _set_ready(slots: list[_Slot]) -> None:
    for slot in slots:
        slot.ready.set()


def measure_step_loop(runtime: ModelRuntime, batch_size: int, steps: int) -> float:
    """The limit the service can approach: characters per second of this module's own decode step +
    vectorised sampling at a fixed batch size, on the calling thread, no HTTP, no event loop."""
    batcher = ContinuousBatcher.__new__(ContinuousBatcher)  # the step methods only; no thread started
    batcher._bind(runtime)
    zero = runtime.example_feeds(1)
    slots = [_Slot(tokens=np.zeros(1, np.int64), temperature=1.0, top_k=0, rng=np.random.default_rng(i),
                   remaining=steps, loop=None, ready=None, token=0,  # type: ignore[arg-type]
                   state={n: zero[n] for n, _, _ in batcher._state}) for i in range(batch_size)]
    batcher._decode(slots)  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        batcher._decode(slots)
    return batch_size * steps / (time.perf_counter() - start)
