"""Continuous batching for /generate: batched decode steps give exactly the unbatched text, requests
join at step boundaries (equal-length prompts prefilled together) and leave when done or abandoned,
failures stay with the requests they hit, characters reach the reader coalesced.

Runs the real tiny char_lstm / char_gru exported to the test session's model store (``tiny_store``).
The step loop runs on its own thread: batch-size assertions submit their requests while the loop is
``held()``, so they join at one boundary whatever the timing.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import numpy as np
import pytest

from models.vocab import Vocabulary
from service.errors import ClientError
from service.generation import (
    MAX_N,
    MAX_NEW_CHARS,
    MAX_PROMPT_CHARS,
    MAX_STOPS,
    MAX_STREAM_CHARS,
    PREFILL_CHARS_PER_STEP,
    ContinuousBatcher,
    GenerationError,
    GenerationRequest,
    _cut_at_stop,
    measure_step_loop,
    read_choices,
    read_chunks,
    sample_token,
    sample_tokens,
)
from service.runtime import ModelRuntime, load_runtime

CHAR_KINDS = ("char_lstm", "char_gru")
HANG_GUARD_S = 300  # not a timing assertion: turns a hung step loop into a failure instead of a stuck suite


@pytest.fixture(scope="module")
def runtimes(tiny_store: dict[str, str]) -> dict[str, ModelRuntime]:
    return {kind: load_runtime(kind, tiny_store[kind]) for kind in CHAR_KINDS}


def onnx_path(tag: str) -> str:
    import bentoml

    model = bentoml.models.get(tag)
    return model.path_of(model.info.metadata["onnx_file"])


@pytest.fixture(params=CHAR_KINDS)
def runtime(request, runtimes: dict[str, ModelRuntime]) -> ModelRuntime:
    return runtimes[request.param]


def generate_alone(runtime: ModelRuntime, request: GenerationRequest) -> str:
    """Reference: the plain unbatched loop (batch 1 throughout), written independently of the batcher."""
    vocab = runtime.metadata["vocab"]
    state_names = [t.name for t in runtime.inputs if t.name != "tokens"]
    rng = np.random.default_rng(request.seed)
    feeds = runtime.example_feeds(1)
    feeds["tokens"] = np.array([[vocab.index(ch) for ch in request.prompt]], dtype=np.int64)
    out = runtime.run(feeds)
    text = []
    while True:
        token = sample_token(out["logits"][0, -1], request.temperature, request.top_k, rng)
        text.append(vocab[token])
        if len(text) == request.max_new_chars:
            return "".join(text)
        out = runtime.run({"tokens": np.array([[token]], dtype=np.int64),
                           **{name: out[f"{name}_out"] for name in state_names}})


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, HANG_GUARD_S))


async def collect(batcher: ContinuousBatcher, request: GenerationRequest) -> str:
    return "".join([chunk async for chunk in batcher.submit(request)])


async def read(stream) -> str:
    return "".join([chunk async for chunk in stream])


def prompt_for(runtime: ModelRuntime) -> str:
    vocab = runtime.metadata["vocab"]
    return "The " if all(ch in vocab for ch in "The ") else vocab[:4]


# -- requests and validation (no model needed) ------------------------------------------------------

VOCAB = "Tabcefh ."


@pytest.mark.parametrize("changes, message", [
    ({"prompt": ""}, "prompt must not be empty"),
    ({"prompt": 42}, "prompt must be a string"),
    ({"prompt": "a" * (MAX_PROMPT_CHARS + 1)}, f"the limit is {MAX_PROMPT_CHARS}"),
    ({"max_new_chars": 0}, "max_new_chars must be an integer in [1, 2000]"),
    ({"max_new_chars": MAX_NEW_CHARS + 1}, "max_new_chars"),
    ({"max_new_chars": 3.5}, "max_new_chars"),
    ({"max_new_chars": True}, "max_new_chars"),
    ({"temperature": -0.5}, "temperature must be a finite number >= 0 (0 = greedy), got -0.5"),
    ({"temperature": -1.0}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"temperature": float("inf")}, "temperature"),
    ({"temperature": "hot"}, "temperature"),
    ({"top_k": 0}, "top_k must be an integer >= 1"),
    ({"top_k": 2.0}, "top_k"),
    ({"seed": -1}, "seed must be a non-negative integer"),
    ({"seed": "7"}, "seed"),
    ({"stream": "yes"}, "stream must be true or false"),
    ({"max_new_chars": MAX_STREAM_CHARS}, "max_new_chars must be an integer in [1, 2000] (10000 when streamed)"),
    ({"max_new_chars": MAX_STREAM_CHARS + 1, "stream": True}, "max_new_chars must be an integer in [1, 10000]"),
    ({"n": 0}, f"n must be an integer in [1, {MAX_N}], got 0"),
    ({"n": 1.5}, "n must be an integer in [1, 16], got 1.5"),
    ({"n": "3"}, "n must be an integer in [1, 16], got '3'"),
    ({"n": True}, "n must be an integer"),
    ({"n": MAX_N + 1}, "n must be an integer in [1, 16], got 17"),
    ({"n": 3, "max_new_chars": 1000}, "n x max_new_chars = 3 x 1000 = 3000 characters; the limit is 2000 per request"),
    ({"n": 2, "max_new_chars": 5001, "stream": True}, "n x max_new_chars = 2 x 5001 = 10002 characters; the limit is "
                                                      "10000 per request"),
])
def test_validate_rejects_out_of_range_parameters(changes: dict, message: str) -> None:
    request = GenerationRequest(**{"prompt": "The cab", **changes})
    with pytest.raises(ClientError) as info:
        request.validate(Vocabulary(VOCAB))
    assert message in str(info.value)
    assert info.value.status == 400


def test_validate_names_characters_outside_the_vocabulary() -> None:
    with pytest.raises(ClientError) as info:
        GenerationRequest("The café\tcab é").validate(Vocabulary(VOCAB))
    message = str(info.value)
    assert "2 character(s) outside the model vocabulary" in message
    assert "'é' (U+00E9)" in message and "'\\t' (U+0009)" in message


def test_validate_accepts_limits_and_from_dict_checks_fields() -> None:
    GenerationRequest("T" * MAX_PROMPT_CHARS, max_new_chars=MAX_NEW_CHARS, temperature=1e-9, top_k=1,
                      seed=0).validate(Vocabulary(VOCAB))
    GenerationRequest("a b", temperature=5, top_k=10_000, seed=2**70).validate(Vocabulary(VOCAB))
    GenerationRequest("ab", max_new_chars=MAX_STREAM_CHARS, stream=True).validate(Vocabulary(VOCAB))
    GenerationRequest("ab", n=MAX_N, max_new_chars=MAX_NEW_CHARS // MAX_N).validate(Vocabulary(VOCAB))
    GenerationRequest("ab", n=2, max_new_chars=MAX_STREAM_CHARS // 2, stream=True).validate(Vocabulary(VOCAB))
    request = GenerationRequest.from_dict({"prompt": "ab", "seed": 3, "stream": True})
    assert (request.prompt, request.seed, request.stream, request.max_new_chars) == ("ab", 3, True, 200)
    with pytest.raises(ClientError, match=r"unknown field\(s\) \['max_tokens'\]"):
        GenerationRequest.from_dict({"prompt": "ab", "max_tokens": 5})
    with pytest.raises(ClientError, match="missing field 'prompt'"):
        GenerationRequest.from_dict({"seed": 1})
    with pytest.raises(ClientError, match="must be a JSON object"):
        GenerationRequest.from_dict(["ab"])


def test_top_p_is_the_nucleus_each_row_its_own() -> None:
    """softmax([ln 5, ln 3, ln 1, ln 1]) = [.5, .3, .1, .1]: top_p 0.5 keeps one token, 0.6 two, 0.85 three
    (ties at the smallest kept probability stay), 1 all; rows of one call each use their own top_p."""
    logits = np.log(np.array([[5.0, 3.0, 1.0, 1.0]] * 4))
    top_ps = np.array([0.5, 0.6, 0.85, 1.0])
    seen = [set() for _ in top_ps]
    rng = np.random.default_rng(0)
    for _ in range(400):
        tokens = sample_tokens(logits, np.ones(4), np.zeros(4, np.int64), rng.random(4), top_ps)
        for row, token in enumerate(tokens):
            seen[row].add(int(token))
    assert seen == [{0}, {0, 1}, {0, 1, 2, 3}, {0, 1, 2, 3}]
    # With top_k first: the nucleus is taken from what top_k left (renormalised): [.625, .375] -> 0.6 keeps one.
    tokens = {int(sample_tokens(logits[:1], np.ones(1), np.array([2]), rng.random(1), np.array([0.6]))[0])
              for _ in range(200)}
    assert tokens == {0}
    # Frequencies inside the nucleus follow the renormalised probabilities.
    counts = np.bincount([sample_token(logits[0], 1.0, None, rng, top_p=0.8) for _ in range(8_000)], minlength=4)
    np.testing.assert_allclose(counts / counts.sum(), [0.625, 0.375, 0, 0], atol=0.02)


def test_stop_strings_cut_the_text_and_hold_back_possible_starts() -> None:
    assert _cut_at_stop("hello world", ["o w", "zz"], False) == ("hell", "", True)
    assert _cut_at_stop("hello wo", ["world"], False) == ("hello ", "wo", False)  # "wo" may become "world"
    assert _cut_at_stop("hello wo", ["world"], True) == ("hello wo", "", False)  # finished: nothing more comes
    assert _cut_at_stop("abc", ["x"], False) == ("abc", "", False)
    for bad in ("", [], ["a"] * (MAX_STOPS + 1), [""], ["x" * 101], 5, [1]):
        with pytest.raises(ClientError, match="stop must be"):
            GenerationRequest("ab", stop=bad).validate(Vocabulary(VOCAB))
    with pytest.raises(ClientError, match="max_tokens must be"):
        GenerationRequest("ab", max_new_chars=0).validate(Vocabulary(VOCAB), {"max_new_chars": "max_tokens"})


def test_stop_string_ends_generation_with_finish_reason(runtime: ModelRuntime) -> None:
    async def run(request: GenerationRequest) -> tuple[str, str]:
        batcher = ContinuousBatcher(runtime)
        try:
            stream = batcher.submit(request, 0.0)
            text = "".join([chunk async for chunk in stream])
            assert batcher.active == 0 and batcher.waiting == 0  # the stop freed the slot
            return text, stream.finish_reason
        finally:
            await batcher.close()

    prompt = prompt_for(runtime)
    full, reason = asyncio.run(run(GenerationRequest(prompt, max_new_chars=120, seed=4)))
    assert reason == "length" and len(full) == 120
    stop = full[60:63]
    text, reason = asyncio.run(run(GenerationRequest(prompt, max_new_chars=120, seed=4, stop=[stop, "\u2603"])))
    assert reason == "stop" and text == full[:full.index(stop)]


def test_sample_token_temperature_top_k_and_seed() -> None:
    logits = np.array([0.5, 3.0, 2.9, -1.0, 1.0], dtype=np.float32)
    # top_k=1 and a vanishing temperature are greedy whatever the seed.
    for seed in range(5):
        assert sample_token(logits, 1.0, 1, np.random.default_rng(seed)) == 1
        assert sample_token(logits, 1e-30, None, np.random.default_rng(seed)) == 1
    # top_k=2 only ever picks the two best tokens.
    rng = np.random.default_rng(0)
    assert {sample_token(logits, 10.0, 2, rng) for _ in range(300)} == {1, 2}
    # Same seed, same draws.
    draws = [[sample_token(logits, 1.0, None, rng) for _ in range(50)] for rng in
             (np.random.default_rng(7), np.random.default_rng(7))]
    assert draws[0] == draws[1]
    # Frequencies follow softmax(logits / temperature).
    temperature, rng = 2.0, np.random.default_rng(1)
    counts = np.bincount([sample_token(logits, temperature, None, rng) for _ in range(8_000)], minlength=5)
    expected = np.exp(logits / temperature) / np.exp(logits / temperature).sum()
    np.testing.assert_allclose(counts / counts.sum(), expected, atol=0.02)


# -- continuous batching on the real tiny models ----------------------------------------------------

def generate_together(runtime: ModelRuntime, requests: list[GenerationRequest],
                      **batcher_options) -> tuple[list[str], list[int]]:
    """All ``requests`` at once through one ContinuousBatcher: their texts, and each decode step's batch size."""
    steps: list[int] = []

    async def main() -> list[str]:
        batcher = ContinuousBatcher(runtime, on_step=lambda size, seconds: steps.append(size), **batcher_options)
        try:
            with batcher.held():  # all join at the first step boundary
                streams = [batcher.submit(r) for r in requests]
            return await asyncio.gather(*(read(s) for s in streams))
        finally:
            await batcher.close()

    return run(main()), steps


def test_concurrent_requests_equal_each_request_alone(runtime: ModelRuntime) -> None:
    prompt = prompt_for(runtime)
    lengths = [30, 5, 50, 17, 1]
    requests = [GenerationRequest(prompt, max_new_chars=n, seed=seed, temperature=t, top_k=k)
                for n, seed, t, k in zip(lengths, [1, 2, 3, 4, 5], [0.8, 1.0, 1.5, 0.5, 1.0],
                                         [None, 5, None, 20, None], strict=True)]
    requests.append(GenerationRequest(prompt[::-1] * 3, max_new_chars=40, seed=6))  # longer prompt
    lengths.append(40)
    texts, steps = generate_together(runtime, requests)
    assert texts == [generate_alone(runtime, r) for r in requests]
    assert [len(t) for t in texts] == lengths
    assert len({t[:5] for t in texts if len(t) >= 5}) > 1  # different seeds gave different texts
    # All joined at the first step boundary (prefill, first character); decode step j then batches
    # exactly the requests that still need a character after j: each left when it was done.
    assert steps == [sum(n > j for n in lengths) for j in range(1, max(lengths))]


def test_request_joins_a_running_batch_at_the_next_step(runtime: ModelRuntime) -> None:
    prompt = prompt_for(runtime)
    long = GenerationRequest(prompt, max_new_chars=MAX_NEW_CHARS, seed=10, temperature=0.9)
    short = GenerationRequest(prompt + prompt, max_new_chars=12, seed=11, top_k=8)
    steps: list[int] = []

    async def main() -> tuple[str, str]:
        batcher = ContinuousBatcher(runtime, on_step=lambda size, seconds: steps.append(size))
        try:
            async with contextlib.aclosing(batcher.submit(long)) as long_stream:
                first = await anext(long_stream)  # the long request is now in the batch
                short_text = await collect(batcher, short)
                assert batcher.active == 1  # the short one left, the long one is still decoding
                long_text = first + "".join([chunk async for chunk in long_stream])
            return long_text, short_text
        finally:
            await batcher.close()

    long_text, short_text = run(main())
    assert long_text == generate_alone(runtime, long)
    assert short_text == generate_alone(runtime, short)
    assert steps.count(2) == short.max_new_chars - 1  # every decode step of the short one was shared
    assert len(steps) == long.max_new_chars - 1 and set(steps) == {1, 2}


def test_equal_length_prompts_are_prefilled_together(runtime: ModelRuntime) -> None:
    """Joining prompts of equal length share one [B, T] prefill call; other lengths get their own."""
    prompt = prompt_for(runtime)
    calls: list[tuple[int, int]] = []
    real_run = runtime.run

    def spy(feeds, outputs=None):
        if feeds["tokens"].shape[1] > 1:
            calls.append(feeds["tokens"].shape)
        return real_run(feeds, outputs)

    requests = [GenerationRequest(prompt, max_new_chars=5, seed=s) for s in (1, 2, 3)]
    requests.append(GenerationRequest(prompt * 2, max_new_chars=5, seed=4))
    runtime.run = spy
    try:
        texts, _ = generate_together(runtime, requests)
    finally:
        del runtime.run
    assert sorted(calls) == sorted([(3, len(prompt)), (1, 2 * len(prompt))])
    assert texts == [generate_alone(runtime, r) for r in requests]


def test_characters_ready_together_reach_the_reader_in_one_chunk(runtime: ModelRuntime) -> None:
    """A reader that is not keeping up gets everything sampled meanwhile as one chunk, not one per character."""
    request = GenerationRequest(prompt_for(runtime), max_new_chars=300, seed=5)

    async def main() -> list[str]:
        batcher = ContinuousBatcher(runtime)
        try:
            stream = batcher.submit(request)
            chunks = [await anext(stream)]
            while batcher.active:  # let the step loop run ahead of this reader
                await asyncio.sleep(0.01)
            return chunks + [chunk async for chunk in stream]
        finally:
            await batcher.close()

    chunks = run(main())
    assert "".join(chunks) == generate_alone(runtime, request)
    assert len(chunks) <= 3, [len(c) for c in chunks]  # the rest came as one chunk


@pytest.mark.parametrize("flush_interval_s", [None, 0.05])
def test_paced_and_whole_text_readers_get_the_same_text(runtime: ModelRuntime, flush_interval_s) -> None:
    """None: one chunk, the whole text; an interval: the first chunk at once, the same text in the end."""
    request = GenerationRequest(prompt_for(runtime), max_new_chars=200, seed=9)

    async def main() -> list[str]:
        batcher = ContinuousBatcher(runtime)
        try:
            return [chunk async for chunk in batcher.submit(request, flush_interval_s)]
        finally:
            await batcher.close()

    chunks = run(main())
    assert "".join(chunks) == generate_alone(runtime, request)
    if flush_interval_s is None:
        assert len(chunks) == 1


def test_max_batch_size_queues_the_rest(runtime: ModelRuntime) -> None:
    prompt = prompt_for(runtime)
    requests = [GenerationRequest(prompt, max_new_chars=8 + i, seed=20 + i) for i in range(5)]
    texts, steps = generate_together(runtime, requests, max_batch_size=2)
    assert texts == [generate_alone(runtime, r) for r in requests]
    assert max(steps) == 2


def test_long_prompts_are_prefilled_over_several_step_boundaries(runtime: ModelRuntime) -> None:
    prompt = prompt_for(runtime)
    long_prompt = prompt * (PREFILL_CHARS_PER_STEP // len(prompt) // 2 + 1)  # two exceed one step's budget
    requests = [GenerationRequest(long_prompt, max_new_chars=6, seed=30 + i) for i in range(3)]
    texts, steps = generate_together(runtime, requests)
    assert texts == [generate_alone(runtime, r) for r in requests]
    # Boundary 1 prefills only the first; boundary 2 prefills the second while the first decodes, ...
    assert steps == [1, 2, 3, 3, 3, 2, 1]


def test_abandoned_stream_frees_its_slot(runtime: ModelRuntime) -> None:
    prompt = prompt_for(runtime)
    steps: list[int] = []

    async def main() -> None:
        batcher = ContinuousBatcher(runtime, on_step=lambda size, seconds: steps.append(size))
        try:
            # 1. The consumer closes the iterator (client disconnected mid-stream).
            stream = batcher.submit(GenerationRequest(prompt, max_new_chars=MAX_NEW_CHARS, seed=1))
            assert await anext(stream)
            assert batcher.active == 1
            await stream.aclose()
            assert (batcher.active, batcher.waiting) == (0, 0)

            # 2. The consuming task is cancelled.
            got_some = asyncio.Event()

            async def consume() -> None:
                async for _ in batcher.submit(GenerationRequest(prompt, max_new_chars=MAX_NEW_CHARS, seed=2)):
                    got_some.set()

            task = asyncio.create_task(consume())
            await got_some.wait()
            assert batcher.active == 1
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert (batcher.active, batcher.waiting) == (0, 0)

            # 3. The batcher keeps serving; the abandoned requests are no longer in its batches.
            steps.clear()
            after = GenerationRequest(prompt, max_new_chars=10, seed=3)
            assert await collect(batcher, after) == generate_alone(runtime, after)
            assert steps[-(after.max_new_chars - 1):] == [1] * (after.max_new_chars - 1)
            assert len(steps) <= after.max_new_chars + 1  # at most one step of each was still in flight
        finally:
            await batcher.close()

    run(main())


def test_random_seed_is_reported_and_reproduces_the_text(runtime: ModelRuntime) -> None:
    request = GenerationRequest(prompt_for(runtime), max_new_chars=25, seed=None)

    async def main() -> str:
        batcher = ContinuousBatcher(runtime)
        try:
            return await collect(batcher, request)
        finally:
            await batcher.close()

    text = run(main())
    assert isinstance(request.seed, int) and request.seed >= 0
    assert text == generate_alone(runtime, request)


def test_client_error_before_first_character_and_batcher_unaffected(runtime: ModelRuntime) -> None:
    outside = next(ch for ch in "\u2603\u00e9~\x00" if ch not in runtime.metadata["vocab"])
    good = GenerationRequest(prompt_for(runtime), max_new_chars=6, seed=4)

    async def main() -> str:
        batcher = ContinuousBatcher(runtime)
        try:
            with pytest.raises(ClientError, match="outside the model vocabulary"):
                await collect(batcher, GenerationRequest("a" + outside))
            with pytest.raises(ClientError, match="temperature"):
                await collect(batcher, GenerationRequest("a", temperature=-1))
            assert (batcher.active, batcher.waiting) == (0, 0)
            return await collect(batcher, good)
        finally:
            await batcher.close()

    assert run(main()) == generate_alone(runtime, good)


def test_failed_prefill_fails_only_its_request(runtimes: dict[str, ModelRuntime], tiny_store: dict[str, str]) -> None:
    # A real misconfiguration: store metadata whose vocab is one character longer than the graph's
    # embedding, so that character's token id makes ONNX Runtime's Gather fail.
    real = runtimes["char_lstm"]
    metadata = {**real.metadata, "vocab": real.metadata["vocab"] + "\u2603"}
    broken = ModelRuntime(real.name, real.version, onnx_path(tiny_store["char_lstm"]), metadata)
    prompt = prompt_for(real)
    good = [GenerationRequest(prompt, max_new_chars=9, seed=s) for s in (1, 2)]

    async def main() -> list[str | BaseException]:
        batcher = ContinuousBatcher(broken)
        try:
            bad = GenerationRequest(prompt + "\u2603", max_new_chars=9, seed=3)
            with batcher.held():
                streams = [batcher.submit(r) for r in (good[0], bad, good[1])]
            return await asyncio.gather(*(read(s) for s in streams), return_exceptions=True)
        finally:
            await batcher.close()

    first, failed, second = run(main())
    assert isinstance(failed, GenerationError) and "generation failed" in str(failed)
    assert [first, second] == [generate_alone(real, r) for r in good]


def test_failed_decode_step_fails_its_requests_not_the_batcher(runtimes: dict[str, ModelRuntime],
                                                               tiny_store: dict[str, str]) -> None:
    # A real ONNX Runtime failure mid-stream: the LSTM runtime's session is swapped for the GRU graph,
    # which rejects the LSTM's `c` input. The requests in that step fail; after the fix it serves again.
    lstm, gru = runtimes["char_lstm"], runtimes["char_gru"]
    runtime = ModelRuntime(lstm.name, lstm.version, onnx_path(tiny_store["char_lstm"]), lstm.metadata)
    good_session = runtime.session
    prompt = prompt_for(lstm)
    after = GenerationRequest(prompt, max_new_chars=7, seed=8)

    async def main() -> str:
        batcher = ContinuousBatcher(runtime)
        try:
            streams = [batcher.submit(GenerationRequest(prompt, max_new_chars=50, seed=s)) for s in (1, 2)]
            for stream in streams:
                await anext(stream)  # both prefilled and in the batch
            runtime.session = gru.session
            for stream in streams:
                with pytest.raises(GenerationError, match="generation failed"):
                    async for _ in stream:
                        pass
            assert (batcher.active, batcher.waiting) == (0, 0)
            runtime.session = good_session
            return await collect(batcher, after)
        finally:
            await batcher.close()

    assert run(main()) == generate_alone(lstm, after)


def test_close_ends_running_requests_with_an_error(runtime: ModelRuntime) -> None:
    async def main() -> None:
        batcher = ContinuousBatcher(runtime)
        stream = batcher.submit(GenerationRequest(prompt_for(runtime), max_new_chars=MAX_NEW_CHARS, seed=1))
        await anext(stream)
        await batcher.close()
        with pytest.raises(GenerationError, match="shutting down"):
            async for _ in stream:
                pass
        with pytest.raises(GenerationError, match="shutting down"):
            await collect(batcher, GenerationRequest(prompt_for(runtime)))

    run(main())


def test_vectorised_sampling_rows_do_not_depend_on_the_batch() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(7, 40)).astype(np.float32) * 3
    temperatures = np.array([0.5, 1.0, 2.0, 1e-9, 1.0, 0.8, 3.0])
    top_ks = np.array([0, 5, 0, 0, 1, 40, 100])
    uniforms = rng.random(7)
    together = sample_tokens(logits, temperatures, top_ks, uniforms)
    alone = [sample_tokens(logits[i:i + 1], temperatures[i:i + 1], top_ks[i:i + 1], uniforms[i:i + 1])[0]
             for i in range(7)]
    assert together.tolist() == alone
    assert together[3] == logits[3].argmax() and together[4] == logits[4].argmax()  # greedy rows
    assert uniforms.max() < 1 and sample_tokens(logits[:1], temperatures[:1], top_ks[:1],
                                                np.array([np.nextafter(1.0, 0)]))[0] < 40


# -- n samples of one prompt -------------------------------------------------------------------------

async def read_all(generations) -> tuple[list[str], list[str | None], list[int]]:
    """Every sample's text and finish reason through read_choices, and the order the chunks came in."""
    texts, reasons, order = [""] * len(generations), [None] * len(generations), []
    async with contextlib.aclosing(read_choices(generations)) as parts:
        async for index, text, reason in parts:
            assert reasons[index] is None  # nothing after a sample's last chunk
            texts[index] += text
            reasons[index] = reason
            order.append(index)
    return texts, reasons, order


def test_n_samples_are_decoded_together_from_one_prefill(runtime: ModelRuntime) -> None:
    """n = 4: one [1, T] prefill for the four samples (beside a one-sample request of the same prompt: [2, T]),
    every decode step has all of them, and sample i is exactly the one-sample text of seed + i."""
    prompt = prompt_for(runtime)
    calls: list[tuple[int, int]] = []
    steps: list[int] = []
    real_run = runtime.run

    def spy(feeds, outputs=None):
        if feeds["tokens"].shape[1] > 1:
            calls.append(feeds["tokens"].shape)
        return real_run(feeds, outputs)

    request = GenerationRequest(prompt, max_new_chars=40, seed=100, temperature=1.3, n=4)
    single = GenerationRequest(prompt, max_new_chars=40, seed=100, temperature=1.3)

    async def main():
        batcher = ContinuousBatcher(runtime, on_step=lambda size, seconds: steps.append(size))
        try:
            with batcher.held():
                samples = batcher.submit_choices(request, 0.0)
                alone = batcher.submit(single, 0.0)
                assert batcher.waiting == 5
            return await asyncio.gather(read_all(samples), read(alone))
        finally:
            await batcher.close()

    runtime.run = spy
    try:
        (texts, reasons, _), single_text = run(main())
    finally:
        del runtime.run
    assert calls == [(2, len(prompt))]  # the four samples shared one prefill row
    assert steps == [5] * (request.max_new_chars - 1)
    assert texts == [generate_alone(runtime, GenerationRequest(prompt, max_new_chars=40, seed=100 + i,
                                                               temperature=1.3)) for i in range(4)]
    assert texts[0] == single_text  # sample 0 is the one-sample request of the same seed
    assert len(set(texts)) == 4 and reasons == ["length"] * 4


def test_n_samples_wait_for_enough_free_slots_and_nobody_overtakes(runtime: ModelRuntime) -> None:
    """max_batch_size 3: a running one-sample request leaves 2 slots; the n = 3 request waits until it is done
    (the samples join together), and a one-sample request behind it waits too (FIFO)."""
    prompt = prompt_for(runtime)
    first = GenerationRequest(prompt, max_new_chars=5, seed=1)
    group = GenerationRequest(prompt, max_new_chars=4, seed=2, n=3)
    last = GenerationRequest(prompt, max_new_chars=2, seed=9)
    texts, steps = None, []

    async def main():
        batcher = ContinuousBatcher(runtime, max_batch_size=3, on_step=lambda size, seconds: steps.append(size))
        try:
            with batcher.held():
                streams = [batcher.submit(first), batcher.submit_choices(group), batcher.submit(last)]
            return await asyncio.gather(read(streams[0]), read_all(streams[1]), read(streams[2]))
        finally:
            await batcher.close()

    first_text, (texts, _, _), last_text = run(main())
    # first decodes alone (4 steps); then the three samples join and decode together (3 steps); `last` only
    # joins after them (its 1 decode step alone) although a slot was free meanwhile.
    assert steps == [1, 1, 1, 1, 3, 3, 3, 1]
    assert first_text == generate_alone(runtime, first) and last_text == generate_alone(runtime, last)
    assert texts == [generate_alone(runtime, GenerationRequest(prompt, max_new_chars=4, seed=2 + i)) for i in range(3)]


def test_n_samples_with_stop_strings_end_each_on_its_own(runtime: ModelRuntime) -> None:
    prompt = prompt_for(runtime)
    full = [generate_alone(runtime, GenerationRequest(prompt, max_new_chars=80, seed=50 + i)) for i in range(3)]
    stop = full[1][30:33]  # met by sample 1; maybe by the others, wherever it first occurs in each

    async def main():
        batcher = ContinuousBatcher(runtime)
        try:
            return await read_all(batcher.submit_choices(
                GenerationRequest(prompt, max_new_chars=80, seed=50, n=3, stop=stop), 0.0))
        finally:
            await batcher.close()

    texts, reasons, order = run(main())
    for text, reason, whole in zip(texts, reasons, full, strict=True):
        assert (text, reason) == ((whole[:whole.index(stop)], "stop") if stop in whole else (whole, "length"))
    assert reasons[1] == "stop" and sorted(set(order)) == [0, 1, 2]


def test_closing_the_samples_frees_every_slot(runtime: ModelRuntime) -> None:
    prompt = prompt_for(runtime)

    async def main() -> None:
        batcher = ContinuousBatcher(runtime)
        try:
            # Closed after the first chunk (a client that went away): all n slots come back at once.
            parts = read_choices(batcher.submit_choices(GenerationRequest(prompt, max_new_chars=500, n=4), 0.0))
            await anext(parts)
            assert batcher.active == 4
            await parts.aclose()
            assert (batcher.active, batcher.waiting) == (0, 0)
            # Closed while still waiting for slots: they leave the queue.
            with batcher.held():
                parts = read_choices(batcher.submit_choices(GenerationRequest(prompt, max_new_chars=5, n=3), 0.0))
                assert batcher.waiting == 3
                task = asyncio.create_task(anext(parts))
                await asyncio.sleep(0)  # the readers start and wait
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
                await parts.aclose()
                assert (batcher.active, batcher.waiting) == (0, 0)
            after = GenerationRequest(prompt, max_new_chars=6, seed=3)
            assert await collect(batcher, after) == generate_alone(runtime, after)  # still serving
        finally:
            await batcher.close()

    run(main())


def test_n_over_the_batch_size_is_a_client_error(runtime: ModelRuntime) -> None:
    async def main() -> None:
        batcher = ContinuousBatcher(runtime, max_batch_size=4)
        try:
            with pytest.raises(ClientError, match="n is 5; this server decodes at most 4 sequences together"):
                batcher.submit_choices(GenerationRequest(prompt_for(runtime), max_new_chars=5, n=5))
            with pytest.raises(ClientError, match="n must be an integer"):
                batcher.submit_choices(GenerationRequest(prompt_for(runtime), n=0))
            assert (batcher.active, batcher.waiting) == (0, 0)
        finally:
            await batcher.close()

    run(main())


def test_measure_step_loop_reports_a_rate(runtimes: dict[str, ModelRuntime]) -> None:
    assert measure_step_loop(runtimes["char_lstm"], batch_size=4, steps=20) > 0


def test_measure_step_loop_counts_every_row_of_every_step(runtimes: dict[str, ModelRuntime]) -> None:
    # The loop times itself inside this call, so its rate can never be below the characters it produced
    # (batch_size x steps) over the call's whole wall time; a rate that forgot the batch rows would be.
    start = time.perf_counter()
    rate = measure_step_loop(runtimes["char_lstm"], batch_size=4, steps=20)
    assert rate >= 4 * 20 / (time.perf_counter() - start)


def test_generation_module_does_not_import_torch() -> None:
    import subprocess
    import sys

    code = "import sys, service.generation; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64) - logits.max()
    return z - np.log(np.exp(z).sum())


def greedy_alone(runtime: ModelRuntime, prompt: str, chars: int) -> tuple[str, list[np.ndarray], np.ndarray]:
    """Reference, independent of the batcher: argmax each step; (text, each step's log-probabilities, the
    prompt's [T, V] log-probabilities)."""
    vocab = runtime.metadata["vocab"]
    state_names = [t.name for t in runtime.inputs if t.name != "tokens"]
    feeds = runtime.example_feeds(1)
    feeds["tokens"] = np.array([[vocab.index(ch) for ch in prompt]], dtype=np.int64)
    out = runtime.run(feeds)
    prompt_logp = np.stack([log_softmax(row) for row in out["logits"][0]])
    text, steps = [], []
    while len(text) < chars:
        logp = log_softmax(out["logits"][0, -1])
        token = int(np.argmax(logp))
        text.append(vocab[token])
        steps.append(logp)
        out = runtime.run({"tokens": np.array([[token]], dtype=np.int64),
                           **{name: out[f"{name}_out"] for name in state_names}})
    return "".join(text), steps, prompt_logp


def test_temperature_zero_is_greedy_and_logprobs_are_the_models(runtime: ModelRuntime) -> None:
    """temperature 0 = the argmax each step, whatever the seed; ``logprobs`` k gives each token's log-probability
    and the k likeliest, and ``prompt_logprobs`` the prompt's, all equal to the model's log-softmax."""
    prompt, vocab = prompt_for(runtime), runtime.metadata["vocab"]
    expected, steps, prompt_logp = greedy_alone(runtime, prompt, 30)

    async def main():
        batcher = ContinuousBatcher(runtime)
        try:
            plain = await collect(batcher, GenerationRequest(prompt, max_new_chars=30, temperature=0, seed=1))
            generations = batcher.submit_choices(GenerationRequest(prompt, max_new_chars=30, temperature=0, n=2),
                                                 0.0, logprobs=3, prompt_logprobs=True)
            chunks = [chunk async for chunk in read_chunks(generations)]
            return plain, chunks, generations[0].prompt_logprobs
        finally:
            await batcher.close()

    plain, chunks, prompt_scores = run(main())
    assert plain == expected
    for index in (0, 1):
        mine = [c for c in chunks if c.index == index]
        assert "".join(c.text for c in mine) == expected
        scores = [t for c in mine for t in c.logprobs]
        assert [t.token for t in scores] == list(expected)
        for t, logp in zip(scores, steps, strict=True):
            assert t.logprob == pytest.approx(logp[vocab.index(t.token)], abs=1e-5)
            assert [p for p, _ in t.top] == [vocab[i] for i in np.argsort(-logp, kind="stable")[:3]]
            assert t.top[0][1] == pytest.approx(t.logprob, abs=1e-9)  # greedy: the chosen one is the likeliest
    assert [t.token for t in prompt_scores] == list(prompt) and prompt_scores[0].logprob is None
    for i, t in enumerate(prompt_scores[1:], start=1):
        assert t.logprob == pytest.approx(prompt_logp[i - 1][vocab.index(prompt[i])], abs=1e-5)


def test_logprobs_follow_the_text_cut_at_a_stop_string(runtime: ModelRuntime) -> None:
    prompt = prompt_for(runtime)
    expected, _, _ = greedy_alone(runtime, prompt, 40)
    stop = expected[15:17]
    cut = expected[:expected.index(stop)]

    async def main():
        batcher = ContinuousBatcher(runtime)
        try:
            generations = batcher.submit_choices(GenerationRequest(prompt, max_new_chars=40, temperature=0, stop=stop),
                                                 None, logprobs=0)
            return [chunk async for chunk in read_chunks(generations)]
        finally:
            await batcher.close()

    chunks = run(main())
    assert "".join(c.text for c in chunks) == cut and chunks[-1].finish_reason == "stop"
    assert "".join(t.token for c in chunks for t in c.logprobs) == cut
    assert all(t.top == () for c in chunks for t in c.logprobs)
