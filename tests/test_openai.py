"""OpenAI's API over the text models (service/openai_api.py, docs/openai.md), called with the official ``openai``
client as a user would, against the real server: completions and chat, streamed and not, n > 1, stop, seeds,
greedy decoding equal to /generate's, logprobs, a cancelled stream freeing its slot, errors and the token."""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Callable

import httpx
import openai
import pytest
import requests

from service.dataplane import DataPlane
from service.front import FrontDoor
from service.lifecycle import StateDir
from service.openai_api import OpenAIApi, OpenAIError, chat_scene, speakers_of
from service.repository import Repository
from service.settings import Settings
from tests.test_service import metric, scrape

pytestmark = pytest.mark.integration
TEXT_MODELS = ("char_lstm", "char_gru")


@pytest.fixture(scope="module")
def url(live_server) -> str:
    return live_server.http_url


@pytest.fixture(scope="module")
def client(url) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


def generate(url: str, **body) -> dict:
    response = requests.post(f"{url}/generate", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def streamed_completion(client: openai.OpenAI, **kwargs) -> tuple[dict[int, str], dict[int, str], list]:
    """(text per choice, finish_reason per choice, every chunk) of a streamed completion."""
    texts: dict[int, str] = {}
    reasons: dict[int, str] = {}
    chunks = list(client.completions.create(stream=True, **kwargs))
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
            if choice.finish_reason:
                reasons[choice.index] = choice.finish_reason
    return texts, reasons, chunks


# -- chat template (no server) ----------------------------------------------------------------------------------

def test_chat_messages_become_a_play_scene():
    scene = chat_scene([{"role": "system", "content": "A street in Verona."},
                        {"role": "user", "content": "Good morrow!\n\n\nHow now?  "},
                        {"role": "assistant", "name": "NURSE", "content": "Ay, madam."},
                        {"role": "user", "name": "TYBALT", "content": [{"type": "text", "text": "Peace!"}]}],
                       speakers_of(None))
    # A blank line inside a message would end its speech: closed up. The reply speaker: the named assistant.
    assert scene.prompt == ("CHORUS:\nA street in Verona.\n\nROMEO:\nGood morrow!\nHow now?\n\nNURSE:\nAy, madam.\n\n"
                            "TYBALT:\nPeace!\n\nNURSE:\n")
    speakers = speakers_of({"user": "HAMLET", "assistant": "HORATIO"})
    assert chat_scene([{"role": "user", "content": "Hi"}], speakers, "HORATIO").prompt == "HAMLET:\nHi\n\nHORATIO:\n"


def test_chat_scene_keeps_the_latest_speeches_that_fit_and_refuses_bad_messages():
    messages = [{"role": "user", "content": f"{i} " + "x" * 300} for i in range(20)]
    scene = chat_scene(messages, speakers_of(None))
    assert len(scene.prompt) <= 2000 and scene.prompt.endswith("19 " + "x" * 300 + "\n\nJULIET:\n")
    assert "ROMEO:\n0 " not in scene.prompt
    for messages, param in [([{"role": "tool", "content": "x"}], "messages[0].role"),
                            ([{"role": "user", "content": [{"type": "image_url"}]}], "messages[0].content[0].type"),
                            ([{"role": "user", "content": "x" * 2500}], "messages"),
                            ([{"role": "user", "name": "A:B", "content": "x"}], "messages[0].name"), ([], "messages")]:
        with pytest.raises(OpenAIError) as e:
            chat_scene(messages, speakers_of(None))
        assert e.value.param == param, e.value


# -- models, completions ----------------------------------------------------------------------------------------

def test_models_lists_the_text_models(client):
    ids = [m.id for m in client.models.list()]
    assert sorted(ids) == sorted(TEXT_MODELS)
    assert client.models.retrieve("char_gru").id == "char_gru"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("lenet5")


@pytest.mark.parametrize("model", TEXT_MODELS)
def test_completion_equals_generate_and_counts_usage(client, url, model):
    done = client.completions.create(model=model, prompt="ROMEO:\n", max_tokens=40, seed=11, temperature=0.9)
    reference = generate(url, model=model, prompt="ROMEO:\n", max_new_chars=40, seed=11, temperature=0.9)
    assert done.object == "text_completion" and done.model == model and done.id.startswith("cmpl-")
    assert done.choices[0].text == reference["text"] and len(done.choices[0].text) == 40
    assert done.choices[0].finish_reason == "length"
    assert (done.usage.prompt_tokens, done.usage.completion_tokens, done.usage.total_tokens) == (7, 40, 47)


@pytest.mark.parametrize("model", TEXT_MODELS)
def test_streamed_completion_equals_the_whole_one_and_reports_usage_last(client, model):
    whole = client.completions.create(model=model, prompt="The ", max_tokens=300, seed=3)
    texts, reasons, chunks = streamed_completion(client, model=model, prompt="The ", max_tokens=300, seed=3,
                                                 stream_options={"include_usage": True})
    assert texts == {0: whole.choices[0].text} and reasons == {0: "length"}
    assert all(c.object == "text_completion" for c in chunks) and len({c.id for c in chunks}) == 1
    assert all(c.usage is None for c in chunks[:-1]) and chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == 300 and chunks[-1].usage.prompt_tokens == 4


def test_n_choices_and_a_list_of_prompts(client, url):
    done = client.completions.create(model="char_lstm", prompt="The ", max_tokens=30, n=3, seed=5, temperature=1.2)
    reference = generate(url, model="char_lstm", prompt="The ", max_new_chars=30, n=3, seed=5, temperature=1.2)
    assert [c.text for c in sorted(done.choices, key=lambda c: c.index)] == [c["text"] for c in reference["choices"]]
    assert done.usage.completion_tokens == 90 and done.usage.prompt_tokens == 4
    texts, _, _ = streamed_completion(client, model="char_lstm", prompt=["The ", "LEAR:\n"], max_tokens=20, n=2,
                                      seed=5, temperature=1.2)
    assert texts[0] == done.choices[0].text[:20] and texts[1] == done.choices[1].text[:20]
    assert texts[2] == generate(url, model="char_lstm", prompt="LEAR:\n", max_new_chars=20, seed=5,
                                temperature=1.2)["text"]
    assert len(texts) == 4


def test_stop_ends_the_text_before_it(client):
    free = client.completions.create(model="char_lstm", prompt="The ", max_tokens=200, seed=8).choices[0].text
    stop = next(ch for ch in free if ch.isalpha())  # a character the text is known to reach
    done = client.completions.create(model="char_lstm", prompt="The ", max_tokens=200, seed=8, stop=[stop, "zzz"])
    assert done.choices[0].finish_reason == "stop" and done.choices[0].text == free[:free.index(stop)]
    texts, reasons, _ = streamed_completion(client, model="char_lstm", prompt="The ", max_tokens=200, seed=8,
                                            stop=stop)
    assert texts == {0: free[:free.index(stop)]} and reasons == {0: "stop"}


def test_the_same_seed_gives_the_same_text(client):
    first, again, other = (client.completions.create(model="char_gru", prompt="To be", max_tokens=80, seed=s,
                                                     temperature=1.0).choices[0].text for s in (42, 42, 43))
    assert first == again and first != other


def test_temperature_zero_is_greedy_everywhere(client, url):
    greedy = client.completions.create(model="char_lstm", prompt="The ", max_tokens=60, temperature=0, seed=1)
    other_seed = client.completions.create(model="char_lstm", prompt="The ", max_tokens=60, temperature=0, seed=2)
    top_1 = generate(url, model="char_lstm", prompt="The ", max_new_chars=60, top_k=1, seed=9)
    zero = generate(url, model="char_lstm", prompt="The ", max_new_chars=60, temperature=0, seed=10)
    assert greedy.choices[0].text == other_seed.choices[0].text == top_1["text"] == zero["text"]
    # Each chosen token is the likeliest: its log-probability is the top one.
    scored = client.completions.create(model="char_lstm", prompt="The ", max_tokens=20, temperature=0, logprobs=3)
    logprobs = scored.choices[0].logprobs
    assert "".join(logprobs.tokens) == scored.choices[0].text == greedy.choices[0].text[:20]
    for token, value, top in zip(logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs, strict=True):
        assert value == max(top.values()) and top[token] == value and len(top) == 3


def test_logprobs_are_log_probabilities_with_offsets_and_echo(client):
    done = client.completions.create(model="char_gru", prompt="Good ", max_tokens=25, seed=4, logprobs=5, echo=True)
    choice = choice_of(done)
    lp = choice.logprobs
    assert choice.text.startswith("Good ") and "".join(lp.tokens) == choice.text
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # the prompt's first token: nothing before
    assert all(v <= 0 for v in lp.token_logprobs[1:])
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    for top in lp.top_logprobs[1:]:
        assert 5 <= len(top) <= 6 and sum(math.exp(v) for v in top.values()) <= 1 + 1e-6
    texts, _, chunks = streamed_completion(client, model="char_gru", prompt="Good ", max_tokens=25, seed=4, logprobs=5,
                                           echo=True)
    assert texts == {0: choice.text}
    tokens = [t for c in chunks for ch in c.choices if ch.logprobs for t in ch.logprobs.tokens]
    offsets = [o for c in chunks for ch in c.choices if ch.logprobs for o in ch.logprobs.text_offset]
    assert tokens == lp.tokens and offsets == lp.text_offset


def choice_of(done):
    assert len(done.choices) == 1
    return done.choices[0]


# -- chat ---------------------------------------------------------------------------------------------------------

MESSAGES = [{"role": "user", "content": "Good morrow, fair lady."}]
# The tiny test models read the stdlib docs: their vocabulary lacks JULIET's J, so the reply speaker is named.
SPEAKERS = {"speakers": {"assistant": "NURSE"}}
SCENE = "ROMEO:\nGood morrow, fair lady.\n\nNURSE:\n"


@pytest.mark.parametrize("model", TEXT_MODELS)
def test_chat_replies_with_the_next_speech(client, url, model):
    done = client.chat.completions.create(model=model, messages=MESSAGES, seed=6, max_tokens=300, extra_body=SPEAKERS)
    reference = generate(url, model=model, prompt=SCENE, stop="\n\n", max_new_chars=300, seed=6)
    choice = done.choices[0]
    assert done.object == "chat.completion" and done.id.startswith("chatcmpl-")
    assert choice.message.role == "assistant" and choice.message.content == reference["text"]
    assert choice.finish_reason == reference["finish_reason"] and "\n\n" not in choice.message.content
    assert done.usage.prompt_tokens == len(SCENE) and done.usage.completion_tokens == len(choice.message.content)


def test_streamed_chat_with_n_speakers_and_logprobs(client, url):
    kwargs = dict(model="char_lstm", messages=[{"role": "system", "content": "Verona."}, *MESSAGES], seed=2, n=2,
                  max_completion_tokens=200, extra_body={"speakers": {"system": "PROLOGUE", "assistant": "NURSE"}})
    whole = client.chat.completions.create(**kwargs)
    stream = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    texts, roles, reasons = {}, {}, {}
    for chunk in stream[:-1]:
        assert chunk.object == "chat.completion.chunk" and chunk.usage is None
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
            roles.setdefault(choice.index, choice.delta.role)  # the first delta of a choice carries the role
            reasons[choice.index] = choice.finish_reason or reasons.get(choice.index)
    scene = "PROLOGUE:\nVerona.\n\nROMEO:\nGood morrow, fair lady.\n\nNURSE:\n"
    reference = generate(url, model="char_lstm", prompt=scene, stop="\n\n", max_new_chars=200, seed=2, n=2)
    assert texts == {i: c["text"] for i, c in enumerate(reference["choices"])}
    assert [c.message.content for c in whole.choices] == [texts[0], texts[1]]
    assert roles == {0: "assistant", 1: "assistant"} and set(reasons.values()) <= {"stop", "length"}
    assert stream[-1].choices == [] and stream[-1].usage.prompt_tokens == len(scene)
    scored = client.chat.completions.create(model="char_lstm", messages=MESSAGES, seed=2, max_tokens=30, logprobs=True,
                                            top_logprobs=2, extra_body=SPEAKERS)
    content = scored.choices[0].logprobs.content
    assert "".join(t.token for t in content) == scored.choices[0].message.content
    assert all(len(t.top_logprobs) == 2 and t.logprob <= 0 and bytes(t.bytes).decode() == t.token for t in content)


# -- a cancelled stream, errors ---------------------------------------------------------------------------------------

def test_a_cancelled_stream_frees_its_slot(client, url, tiny_store):
    lstm = dict(model="char_lstm", version=tiny_store["char_lstm"].split(":")[1])
    left = dict(endpoint="openai_completions", outcome="client_error", **lstm)
    before = metric(scrape(url), "nnserve_requests_total", **left)
    stream = client.completions.create(model="char_lstm", prompt="The ", max_tokens=5000, n=2, stream=True)
    assert next(iter(stream)).choices
    stream.close()
    deadline = time.monotonic() + 60  # generous on a busy box; usually well under a second
    while time.monotonic() < deadline:
        after = scrape(url)
        if metric(after, "nnserve_requests_total", **left) > before:
            break
        time.sleep(0.2)
    assert metric(after, "nnserve_requests_total", **left) == before + 1, "the cancelled stream was not counted"
    assert metric(after, "nnserve_generation_slots", state="active", **lstm) == 0
    assert client.completions.create(model="char_lstm", prompt="The", max_tokens=5).choices[0].text


@pytest.mark.parametrize(("kwargs", "status", "param", "says"), [
    (dict(model="ghost"), 404, "model", "char_lstm, char_gru"),
    (dict(model="lenet5"), 404, "model", "char_lstm"),
    (dict(suffix="end."), 400, "suffix", "suffix is not supported"),
    (dict(extra_body={"logit_bias": {"5": 100}}), 400, "logit_bias", "not supported"),
    (dict(frequency_penalty=0.5), 400, "frequency_penalty", "not supported"),
    (dict(best_of=3), 400, "best_of", "best_of"),
    (dict(extra_body={"bogus": 1}), 400, "bogus", "Unrecognized request argument"),
    (dict(temperature="hot"), 400, "temperature", "temperature must be a finite number >= 0"),
    (dict(max_tokens=0), 400, "max_tokens", "max_tokens must be an integer in [1, 2000]"),
    (dict(n=3, max_tokens=1000), 400, "n", "n x max_tokens"),
    (dict(stop=["a", "b", "c", "d", "e"]), 400, "stop", "stop must be"),
    (dict(prompt="caf\u00e9"), 400, "prompt", "outside the model vocabulary"),
    (dict(prompt=[10**6]), 400, "prompt", "token ids"),
    (dict(logprobs=50), 400, "logprobs", "logprobs must be an integer in [0, 20]"),
])
def test_completion_errors_are_openai_error_objects(client, kwargs, status, param, says):
    request = dict(model="char_lstm", prompt="The ", max_tokens=10) | kwargs
    with pytest.raises(openai.APIStatusError) as e:
        client.completions.create(**request)
    assert e.value.status_code == status, e.value
    error = e.value.body
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param, error
    assert says in error["message"] and error["type"] == "invalid_request_error"


@pytest.mark.parametrize(("kwargs", "param"), [
    (dict(tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}]), "tools"),
    (dict(response_format={"type": "json_object"}), "response_format"),
    (dict(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
     "messages[0].content[0].type"),
    (dict(top_logprobs=3), "top_logprobs"),
    (dict(max_tokens=5, max_completion_tokens=5), "max_tokens"),
])
def test_chat_errors_name_the_parameter(client, kwargs, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(**(dict(model="char_gru", messages=MESSAGES, extra_body=SPEAKERS) | kwargs))
    assert e.value.body["param"] == param, e.value.body


def test_no_op_values_of_unsupported_parameters_pass(client):
    """What chat front ends send by default asks for nothing a char model lacks: accepted."""
    done = client.chat.completions.create(model="char_gru", messages=MESSAGES, max_tokens=5, frequency_penalty=0.0,
                                          presence_penalty=0, tools=[], response_format={"type": "text"}, user="u1",
                                          extra_body=SPEAKERS)
    assert done.choices[0].message.content is not None


def test_unknown_v1_routes_answer_an_error_object_counted_under_v1(url):
    before = metric(scrape(url), "nnserve_http_responses_total", route="v1", code="404")
    response = requests.post(f"{url}/v1/embeddings", json={"model": "char_lstm", "input": "x"}, timeout=30)
    assert response.status_code == 404 and response.json()["error"]["type"] == "invalid_request_error"
    assert "POST /v1/chat/completions" in response.json()["error"]["message"]  # says what is served
    wrong = requests.get(f"{url}/v1/completions", timeout=30)
    assert wrong.status_code == 405 and "not allowed" in wrong.json()["error"]["message"]
    assert metric(scrape(url), "nnserve_http_responses_total", route="v1", code="404") == before + 1


def test_past_the_admission_limit_v1_answers_503_in_openai_s_error_object(tiny_store, tmp_path):
    """The data plane's one admission count refuses /v1 as every protocol, in OpenAI's error object: the real
    front door, codec, data plane and repository in this process, the worker's one slot held by "another
    request"; listing models is never refused."""
    config = tmp_path / "models.json"
    config.write_text(json.dumps({"models": {"char_lstm": {"tag": tiny_store["char_lstm"]}}}))
    settings = Settings.from_env({"NNSERVE_MODELS_CONFIG": str(config), "NNSERVE_MAX_CONCURRENT_REQUESTS": "1"})
    repository = Repository(settings, StateDir(tmp_path / "state", settings), worker=1)
    plane = DataPlane(repository)
    repository.start_loading()
    assert repository.loaded.wait(120)

    async def bentoml_stand_in(scope: dict, receive: Callable, send: Callable) -> None:
        raise AssertionError(f"{scope['path']} reached BentoML")

    door = FrontDoor(bentoml_stand_in, None, None, lambda: plane, openai=OpenAIApi(lambda: plane).router())
    body = {"model": "char_lstm", "prompt": "The ", "max_tokens": 5}

    async def steps() -> None:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=door), base_url="http://test") as client:
            plane.admit()  # another request holds the worker's one slot
            try:
                refused = await client.post("/v1/completions", json=body)
                listed = await client.get("/v1/models")
            finally:
                plane.release()
            assert refused.status_code == 503 and int(refused.headers["retry-after"]) >= 1, refused.text
            error = refused.json()["error"]
            assert error["type"] == "service_unavailable" and "NNSERVE_MAX_CONCURRENT_REQUESTS" in error["message"]
            assert listed.status_code == 200 and [m["id"] for m in listed.json()["data"]] == ["char_lstm"]
            done = await client.post("/v1/completions", json=body)
            assert done.status_code == 200 and len(done.json()["choices"][0]["text"]) == 5, done.text
            assert plane.in_flight == 0

    try:
        asyncio.run(steps())
    finally:
        repository.close()


def test_the_bench_clients_read_openai_streams_as_generate_streams(url):
    """The bench's /v1/completions client (loadtest/bench/protocol_clients.py) against the real server: every
    stream complete, the same characters per request as /generate's client."""
    from loadtest.bench.protocol_clients import Options, openai_generate, rest_generate

    options = Options(url, ["The ", "To be"], chars=50)
    for client in (openai_generate, rest_generate):
        calls = client(options, 0, time.time() + 1.5)
        assert calls and all(c.ok and c.units == 50 and c.started <= c.first <= c.ended for c in calls), calls[:3]


# -- the inference token -----------------------------------------------------------------------------------------

def test_the_api_key_is_the_inference_token(own_server, tmp_path):
    token = "openai-test-token-0123456789"
    path = tmp_path / "inference-token"
    path.write_text(token + "\n")
    path.chmod(0o600)
    with own_server("openai-token", {"NNSERVE_INFERENCE_TOKEN_FILE": str(path)}) as live:
        base = f"{live.http_url}/v1"
        good = openai.OpenAI(base_url=base, api_key=token, max_retries=0, timeout=120)
        assert good.completions.create(model="char_gru", prompt="The ", max_tokens=5).choices[0].text
        assert [m.id for m in good.models.list()]
        with pytest.raises(openai.PermissionDeniedError) as e:
            openai.OpenAI(base_url=base, api_key="wrong-token-0123456789", max_retries=0).models.list()
        assert e.value.body["type"] == "permission_error" and token not in str(e.value.body)
        response = requests.get(f"{base}/models", timeout=30)
        assert response.status_code == 401 and response.json()["error"]["type"] == "authentication_error"
