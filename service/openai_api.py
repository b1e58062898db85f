"""OpenAI's API over the text models: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions``.

A thin codec over the data plane (service/dataplane.py), served by the front door (service/front.py)
through service/asgi.py as rest.py is: the front door takes the admission slot; a request becomes one
``GenerationRequest`` per prompt, validated by the same code as ``/generate`` (``GenerationRequest.validate``,
parameters mapped by the model kind's ``sampling_options``), its model resolved and its generation started
by the data plane, on the same continuous batcher as every other front end; the chunks become OpenAI's
objects. Streams are server-sent events of ``text_completion`` / ``chat.completion.chunk`` objects ended by
``data: [DONE]``. Errors are OpenAI's error object; their status comes from the one error model
(service/errors.py), only the body is OpenAI's (docs/openai.md).

Chat is a play scene (the layout the char models learned, models/shakespeare.py): each message is a speech,
``SPEAKER:\\ntext\\n\\n``, its speaker the message's ``name`` or its role's default (``speakers`` overrides
them per request); the prompt ends with the reply speaker's ``SPEAKER:\\n`` and the reply is generated until
the blank line that ends a speech.

Parameters OpenAI defines that a char model cannot honour are a 400 naming the parameter unless their
value asks for nothing (null, 0, false, an empty list, the default), so clients that always send them work.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import secrets
import time
from collections.abc import AsyncGenerator, Callable, Mapping
from dataclasses import dataclass

import orjson

from models.kinds.base import RequestError
from models.vocab import Vocabulary, VocabularyError
from service import metrics
from service.asgi import HttpRequest, HttpResponse, Router, failure_response, json_response
from service.dataplane import DataPlane
from service.errors import ClientError, Failure, NotFound, Unavailable, failure_of
from service.generation import (
    MAX_N,
    MAX_NEW_CHARS,
    MAX_PROMPT_CHARS,
    MAX_STOPS,
    MAX_STREAM_CHARS,
    Chunk,
    Generation,
    GenerationRequest,
    TokenLogprob,
    read_chunks,
)
from service.runtime import ModelRuntime

log = logging.getLogger("nnserve.openai")

MAX_JSON_BYTES = 256 << 10  # a chat history: messages beyond the prompt limit are dropped, but arrive first
COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
CHAT_MAX_TOKENS = 500  # a speech; OpenAI's chat has no fixed default (up to the context)
MAX_SPEAKER_CHARS = 40
SPEECH_END = "\n\n"  # a blank line ends a speech in the play layout
DEFAULT_SPEAKERS = {"system": "CHORUS", "user": "ROMEO", "assistant": "JULIET"}
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}

# OpenAI's sampling parameters -> the kind's sampling_options names (shared with Triton's generate extension).
SAMPLING = ("max_tokens", "temperature", "top_p", "seed", "stop", "n", "top_k")  # top_k: vLLM's extension
COMMON = {"model", "stream", "stream_options", "user", "logprobs"}
COMPLETION_FIELDS = COMMON | set(SAMPLING) | {"prompt", "echo", "best_of", "suffix", "frequency_penalty",
                                              "presence_penalty", "logit_bias"}
CHAT_FIELDS = COMMON | set(SAMPLING) | {"messages", "max_completion_tokens", "top_logprobs", "speakers",
                                        "frequency_penalty", "presence_penalty", "logit_bias", "tools", "tool_choice",
                                        "functions", "function_call", "parallel_tool_calls", "response_format",
                                        "modalities", "audio", "prediction", "reasoning_effort", "verbosity",
                                        "web_search_options", "store", "metadata", "service_tier",
                                        "prompt_cache_key", "safety_identifier"}
# Parameters a char model cannot honour: the values that ask for nothing (besides null). Others are a 400.
NO_OP = {"suffix": ("",), "frequency_penalty": (0,), "presence_penalty": (0,), "logit_bias": ({},),
         "tools": ([],), "functions": ([],), "tool_choice": ("none", "auto"), "function_call": ("none", "auto"),
         "response_format": ({"type": "text"},), "modalities": (["text"],), "store": (False,),
         "audio": (), "prediction": (), "reasoning_effort": (), "verbosity": (), "web_search_options": ()}
WHY_NOT = {"suffix": "a char model continues text; it cannot fill in before a suffix",
           "frequency_penalty": "penalties are not implemented", "presence_penalty": "penalties are not implemented",
           "logit_bias": "token biases are not implemented", "tools": "a char model cannot call tools",
           "functions": "a char model cannot call functions", "tool_choice": "a char model cannot call tools",
           "function_call": "a char model cannot call functions",
           "response_format": "a char model cannot be held to a format (only {'type': 'text'})",
           "modalities": "text is the only modality", "store": "completions are not stored",
           "audio": "text is the only modality", "prediction": "predicted outputs are not implemented",
           "reasoning_effort": "a char model does not reason", "verbosity": "a char model has no verbosity setting",
           "web_search_options": "a char model cannot search the web"}


class OpenAIError(ClientError):
    """A ClientError (400) with OpenAI's ``param`` and ``code``."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param, self.code = param, code


class ModelNotFound(OpenAIError, NotFound):
    """An unknown model (or version), or one that does not generate text: 404 ``model_not_found``."""

    def __init__(self, message: str) -> None:
        super().__init__(message, "model", "model_not_found")


# OpenAI's error ``type`` by status; the status itself is the error model's (service/errors.py).
ERROR_TYPES = {401: "authentication_error", 403: "permission_error", 404: "invalid_request_error",
               429: "rate_limit_error", 503: "service_unavailable"}


def error_object(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    """OpenAI's error body: ``{"error": {"message", "type", "param", "code"}}``, its type by status."""
    kind = ERROR_TYPES.get(status) or ("invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(error: BaseException | Failure, where: str = "v1", params: tuple[str, ...] = ()
                   ) -> HttpResponse:
    """OpenAI's error object for ``error``: status, message and Retry-After from the one error model
    (``failure_of``), ``param`` and ``code`` from an OpenAIError, else ``param`` the first of ``params`` that
    the message starts with (the shared validation names the field first: "max_tokens must be ...")."""
    failure = error if isinstance(error, Failure) else failure_of(error, where)
    param, code = getattr(error, "param", None), getattr(error, "code", None)
    if param is None and failure.status < 500:
        param = next((p for p in params if re.match(rf"{re.escape(p)}\b", failure.message)), None)
    return failure_response(failure, error_object(failure.status, failure.message, param, code))


def failed(record: metrics.RequestMetrics, error: Exception, params: tuple[str, ...]) -> HttpResponse:
    """A failed request's error object, counted by outcome."""
    response = error_response(error, record.endpoint, params)
    record.finish(response.status)
    return response


# ---- requests --------------------------------------------------------------------------------------------------

def parse_body(body: bytes, fields: set[str]) -> dict:
    try:
        parsed = json.loads(body)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:  # ValueError: also a 4300+ digit integer
        raise OpenAIError(f"the body must be a JSON object ({type(e).__name__}: {str(e)[:200]})") from e
    if not isinstance(parsed, dict):
        raise OpenAIError(f"the body must be a JSON object, got {type(parsed).__name__}")
    unknown = sorted(set(parsed) - fields)
    if unknown:
        raise OpenAIError(f"Unrecognized request argument supplied: {unknown[0][:50]}", unknown[0][:50],
                          "unrecognized_argument")
    for name in sorted(set(parsed) & set(NO_OP)):
        value = parsed[name]
        if value is not None and not any(_same(value, ok) for ok in NO_OP[name]):
            raise OpenAIError(f"{name} is not supported: {WHY_NOT[name]} (got {_show(value)})", name,
                              "unsupported_parameter")
    for name in ("model",):
        if name not in parsed:
            raise OpenAIError(f"you must provide a {name} parameter", name, "missing_required_parameter")
    return parsed


def _same(value: object, ok: object) -> bool:
    """JSON equality: 0 and 0.0 are the same number; true is not 1."""
    if isinstance(ok, int | float) and not isinstance(ok, bool):
        return isinstance(value, int | float) and not isinstance(value, bool) and value == ok
    return type(value) is type(ok) and value == ok


def _show(value: object) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def text_models(plane: DataPlane) -> list[str]:
    """The served models that generate text (ready or loading), in config order."""
    return plane.models_for("/generate")


def unknown_model(model: str, served: list[str]) -> ModelNotFound:
    return ModelNotFound(f"The model {model[:100]!r} does not exist; served models: {', '.join(served) or 'none'}")


def resolve_model(plane: DataPlane, model: object) -> ModelRuntime:
    """The runtime for OpenAI's ``model``: ``name`` or ``name:version``, resolved by the data plane (held until
    the request is over). Unknown: 404 listing the text models; loading or failed: the data plane's 503."""
    if not isinstance(model, str):
        raise OpenAIError(f"model must be a string, got {type(model).__name__}", "model")
    name, _, version = model.partition(":")
    try:
        return plane.model(name, version, "/generate")
    except NotFound as e:
        served = text_models(plane)
        if name in served:  # an unknown version of a served model: the data plane's message lists its versions
            raise ModelNotFound(str(e)) from e
        raise unknown_model(model, served) from e
    except Unavailable:  # loading, waiting for its export, failed to load: 503 with the reason
        raise
    except ClientError as e:  # a model of another kind
        raise ModelNotFound(f"model {name!r} does not generate text; served text models: "
                            f"{', '.join(text_models(plane))}") from e


def sampling(runtime: ModelRuntime, body: Mapping, prompt_name: str) -> tuple[dict, dict]:
    """The GenerationRequest fields of OpenAI's sampling parameters (the kind's mapping, as Triton's generate
    extension), and field -> OpenAI name for the shared validation's messages."""
    try:
        fields, names = runtime.kind_module.sampling_options({k: body[k] for k in SAMPLING if body.get(k) is not None})
    except RequestError as e:
        raise OpenAIError(f"model {runtime.name!r}: {e}") from e
    return fields, names | {"prompt": prompt_name}


def stream_flags(body: Mapping) -> tuple[bool, bool]:
    """(stream, include_usage)."""
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise OpenAIError(f"stream must be true or false, got {_show(stream)}", "stream")
    options = body.get("stream_options")
    if options is None:
        return bool(stream), False
    if not stream:
        raise OpenAIError("stream_options is only allowed when stream is true", "stream_options")
    if not isinstance(options, dict) or set(options) - {"include_usage", "include_obfuscation"}:
        raise OpenAIError(f"stream_options must be an object with include_usage, got {_show(options)}",
                          "stream_options")
    include = options.get("include_usage", False)
    if not isinstance(include, bool):
        raise OpenAIError(f"stream_options.include_usage must be true or false, got {_show(include)}",
                          "stream_options.include_usage")
    return True, include


def prompts_of(prompt: object, vocab: Vocabulary) -> list[str]:
    """/v1/completions ``prompt``: a string, a list of strings, a list of token ids or a list of such lists."""
    def from_ids(ids: list) -> str:
        if not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < len(vocab) for i in ids):
            raise OpenAIError(f"prompt: token ids must be integers in [0, {len(vocab)}) (the model's vocabulary, "
                              "GET /models)", "prompt")
        return vocab.decode(ids)

    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt):
            return list(prompt)
        if all(isinstance(p, int) for p in prompt):
            return [from_ids(prompt)]
        if all(isinstance(p, list) and p for p in prompt):
            return [from_ids(p) for p in prompt]
    raise OpenAIError("prompt must be a string, a list of strings, a list of token ids or a list of lists of token "
                      f"ids (not empty), got {_show(prompt)}", "prompt")


def count_tokens(vocab: Vocabulary, text: str) -> int:
    """``usage`` counts the model's tokens (characters for a char model)."""
    if vocab.is_chars:
        return len(text)
    try:
        return len(vocab.encode(text))
    except VocabularyError:  # a stop string cut a token
        return len(text)


# ---- chat as a play scene ------------------------------------------------------------------------------------------

def speakers_of(value: object) -> dict[str, str]:
    """The per-role default speakers, with the request's ``speakers`` (an nnserve extension) applied."""
    if value is None:
        return dict(DEFAULT_SPEAKERS)
    if not isinstance(value, dict) or set(value) - set(DEFAULT_SPEAKERS):
        raise OpenAIError(f"speakers must be an object with some of {sorted(DEFAULT_SPEAKERS)}, got {_show(value)}",
                          "speakers")
    return DEFAULT_SPEAKERS | {role: speaker_name(name, f"speakers.{role}") for role, name in value.items()}


def speaker_name(name: object, param: str) -> str:
    if not isinstance(name, str) or not 1 <= len(name.strip()) <= MAX_SPEAKER_CHARS or re.search(r"[\n:]", name):
        raise OpenAIError(f"{param} must be a speaker's name: 1 to {MAX_SPEAKER_CHARS} characters, no line break or "
                          f"':', got {_show(name)}", param)
    return name.strip()


def speech_text(content: object, index: int) -> str:
    """A message's content as one speech: text parts joined, blank lines closed up (a blank line ends a speech)."""
    param = f"messages[{index}].content"
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise OpenAIError(f"{param}[{j}]: only text parts are supported (a char model reads text), got "
                                  f"{_show(kind)}", f"{param}[{j}].type")
            texts.append(part["text"])
        content = "\n".join(texts)
    if not isinstance(content, str):
        raise OpenAIError(f"{param} must be a string or a list of text parts, got {_show(content)}", param)
    return re.sub(r"\n\s*\n+", "\n", content.replace("\r\n", "\n")).strip()


@dataclass
class Scene:
    prompt: str  # the speeches that fit, then the reply speaker's heading
    speaker: str  # who replies


def chat_scene(messages: object, speakers: dict[str, str], reply: str | None = None) -> Scene:
    """The play scene of ``messages``: ``SPEAKER:\\ntext\\n\\n`` per message, then the reply speaker's
    ``SPEAKER:\\n``. The reply speaker: ``reply`` (the request's ``speakers.assistant``) if given, else the name
    of the last assistant message that has one, else the assistant default. The oldest speeches are dropped to
    fit the prompt limit."""
    if not isinstance(messages, list) or not messages:
        raise OpenAIError("messages must be a non-empty list of {role, content} objects", "messages")
    speeches, named_reply = [], None
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise OpenAIError(f"messages[{i}] must be an object with role and content", f"messages[{i}]")
        role = message.get("role")
        if role in ("tool", "function") or message.get("tool_calls") or message.get("function_call"):
            raise OpenAIError(f"messages[{i}]: tool and function messages are not supported (a char model cannot "
                              "call tools)", f"messages[{i}].role")
        if role not in ROLES:
            raise OpenAIError(f"messages[{i}].role must be one of {sorted(ROLES)}, got {_show(role)}",
                              f"messages[{i}].role")
        extra = sorted(set(message) - {"role", "content", "name", "refusal", "annotations", "audio"})
        if extra:
            raise OpenAIError(f"messages[{i}]: unknown field {extra[0][:50]!r}", f"messages[{i}].{extra[0][:50]}")
        name = message.get("name")
        speaker = speaker_name(name, f"messages[{i}].name") if name is not None else speakers[ROLES[role]]
        if ROLES[role] == "assistant" and name is not None:
            named_reply = speaker
        text = speech_text(message.get("content"), i)
        if text:
            speeches.append(f"{speaker}:\n{text}{SPEECH_END}")
    reply = reply or named_reply or speakers["assistant"]
    heading = f"{reply}:\n"
    kept: list[str] = []
    size = len(heading)
    for speech in reversed(speeches):
        if size + len(speech) > MAX_PROMPT_CHARS:
            break
        kept.append(speech)
        size += len(speech)
    if speeches and not kept:
        raise OpenAIError(f"the last message is too long: {len(speeches[-1])} characters as a speech; the prompt "
                          f"limit is {MAX_PROMPT_CHARS}", "messages", "context_length_exceeded")
    return Scene("".join(reversed(kept)) + heading, reply)


# ---- logprobs in OpenAI's two formats ------------------------------------------------------------------------------

def completion_logprobs(tokens: list[TokenLogprob], offset: int) -> dict:
    """Legacy completions: parallel lists; ``top_logprobs`` holds the alternatives and the chosen token."""
    offsets, at = [], offset
    for token in tokens:
        offsets.append(at)
        at += len(token.token)
    return {"tokens": [t.token for t in tokens], "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": [None if t.logprob is None else dict(t.top) | ({} if any(p == t.token for p, _ in t.top)
                                                                          else {t.token: t.logprob})
                             for t in tokens],
            "text_offset": offsets}


def chat_logprobs(tokens: list[TokenLogprob]) -> dict:
    def entry(token: str, logprob: float | None) -> dict:  # None only for a prompt's first token: not in chat
        return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

    return {"content": [entry(t.token, t.logprob) | {"top_logprobs": [entry(p, lp) for p, lp in t.top]}
                        for t in tokens], "refusal": None}


def merge_completion_logprobs(parts: list[dict]) -> dict:
    return {key: [x for part in parts for x in part[key]] for key in ("tokens", "token_logprobs", "top_logprobs",
                                                                      "text_offset")}


# ---- the app -------------------------------------------------------------------------------------------------------

@dataclass
class Job:
    """One OpenAI request on the batcher: its generations (choice i = prompt i // n, sample i % n)."""

    runtime: ModelRuntime
    vocab: Vocabulary
    prompts: list[str]
    n: int
    generations: list[Generation]
    prompt_tokens: int
    stream: bool
    include_usage: bool
    logprobs: int | None
    chat: bool
    echo: bool = False


ROUTES_HINT = ("nnserve answers GET /v1/models, GET /v1/models/{model}, POST /v1/completions and "
               "POST /v1/chat/completions")
SSE = b"text/event-stream"


class OpenAIApi:
    """The /v1 routes over ``plane()`` (the worker's data plane)."""

    def __init__(self, plane: Callable[[], DataPlane]) -> None:
        self.plane = plane

    def router(self) -> Router:
        router = Router("OpenAI API", errors=error_response, hint=ROUTES_HINT)
        for path, method, handler in (("/v1/models", "GET", self.list_models),
                                      ("/v1/models/{model}", "GET", self.get_model),
                                      ("/v1/completions", "POST", self.completions),
                                      ("/v1/chat/completions", "POST", self.chat_completions)):
            router.add(path, method, handler)
        return router

    async def list_models(self, request: HttpRequest) -> HttpResponse:
        return json_response({"object": "list", "data": [model_object(n) for n in text_models(self.plane())]})

    async def get_model(self, request: HttpRequest) -> HttpResponse:
        name, served = request.params["model"], text_models(self.plane())
        if name not in served:
            return error_response(unknown_model(name, served))
        return json_response(model_object(name))

    async def completions(self, request: HttpRequest) -> HttpResponse:
        record = metrics.RequestMetrics("openai_completions")
        try:
            body = parse_body(await request.body(MAX_JSON_BYTES), COMPLETION_FIELDS)
            stream, include_usage = stream_flags(body)
            plane = self.plane()
            runtime = resolve_model(plane, body["model"])
            record.begin(runtime)
            if "prompt" not in body:
                raise OpenAIError("you must provide a prompt parameter", "prompt", "missing_required_parameter")
            prompts = prompts_of(body["prompt"], plane.vocabulary(runtime))
            echo = body.get("echo") or False
            if not isinstance(echo, bool):
                raise OpenAIError(f"echo must be true or false, got {_show(echo)}", "echo")
            logprobs = body.get("logprobs")
            if logprobs is not None and (isinstance(logprobs, bool) or not isinstance(logprobs, int)):
                raise OpenAIError(f"logprobs must be an integer (the alternatives listed per token) or null, got "
                                  f"{_show(logprobs)}", "logprobs")
            n = body.get("n") or 1
            best_of = body.get("best_of")
            if best_of is not None and best_of != n:
                raise OpenAIError(f"best_of is not supported unless it equals n: choosing the best of several "
                                  f"samples is not implemented (got best_of={_show(best_of)}, n={_show(n)})",
                                  "best_of", "unsupported_parameter")
            job = start(plane, runtime, prompts, body, "prompt", COMPLETION_MAX_TOKENS, stream, include_usage,
                        logprobs, chat=False, echo=echo)
            return await answer(job, record)
        except Exception as e:
            return failed(record, e, COMPLETION_PARAMS)

    async def chat_completions(self, request: HttpRequest) -> HttpResponse:
        record = metrics.RequestMetrics("openai_chat")
        try:
            body = parse_body(await request.body(MAX_JSON_BYTES), CHAT_FIELDS)
            stream, include_usage = stream_flags(body)
            if body.get("max_completion_tokens") is not None:
                if body.get("max_tokens") is not None:
                    raise OpenAIError("send max_completion_tokens or max_tokens, not both", "max_tokens")
                body = body | {"max_tokens": body["max_completion_tokens"]}
            logprobs, top = body.get("logprobs"), body.get("top_logprobs")
            if logprobs is not None and not isinstance(logprobs, bool):
                raise OpenAIError(f"logprobs must be true or false, got {_show(logprobs)}", "logprobs")
            if top is not None and not logprobs:
                raise OpenAIError("top_logprobs needs logprobs: true", "top_logprobs")
            if top is not None and (isinstance(top, bool) or not isinstance(top, int)):
                raise OpenAIError(f"top_logprobs must be an integer, got {_show(top)}", "top_logprobs")
            speakers = speakers_of(body.get("speakers"))
            scene = chat_scene(body.get("messages"), speakers,
                               speakers["assistant"] if "assistant" in (body.get("speakers") or {}) else None)
            stops = body.get("stop")
            stops = [stops] if isinstance(stops, str) else stops
            if isinstance(stops, list) and len(stops) >= MAX_STOPS:
                raise OpenAIError(f"stop: at most {MAX_STOPS - 1} strings in a chat (the blank line that ends a "
                                  "speech is one more)", "stop")
            body = body | {"stop": [*(stops or []), SPEECH_END] if isinstance(stops, list | type(None)) else stops}
            plane = self.plane()
            runtime = resolve_model(plane, body["model"])
            record.begin(runtime)
            job = start(plane, runtime, [scene.prompt], body, "messages", CHAT_MAX_TOKENS, stream, include_usage,
                        (top or 0) if logprobs else None, chat=True)
            return await answer(job, record)
        except Exception as e:
            return failed(record, e, CHAT_PARAMS)


COMPLETION_PARAMS = ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "n", "prompt", "logprobs",
                     "stream", "model")
CHAT_PARAMS = ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "n", "messages", "logprobs",
               "top_logprobs", "stream", "model")


def model_object(name: str) -> dict:
    return {"id": name, "object": "model", "created": 0, "owned_by": "nnserve"}


def start(plane: DataPlane, runtime: ModelRuntime, prompts: list[str], body: Mapping, prompt_name: str,
          default_max_tokens: int, stream: bool, include_usage: bool, logprobs: int | None, chat: bool,
          echo: bool = False) -> Job:
    """Validate every prompt's GenerationRequest (the /generate checks), then start them all through the data
    plane (the model's continuous batcher); nothing is queued if any is invalid."""
    fields, names = sampling(runtime, body, prompt_name)
    n = fields.get("n", 1)
    if isinstance(n, int) and n >= 1:  # the default fits the per-request character limit (else: n's error)
        default_max_tokens = max(1, min(default_max_tokens, (MAX_STREAM_CHARS if stream else MAX_NEW_CHARS) // n))
    fields.setdefault("max_new_chars", default_max_tokens)
    if fields.get("seed") is None:  # one seed for every prompt: the whole request is reproducible from it
        fields["seed"] = secrets.randbits(63)
    vocab = plane.vocabulary(runtime)
    jobs = [GenerationRequest(prompt=p, model=runtime.name, stream=stream, **fields) for p in prompts]
    for job in jobs:
        job.validate(vocab, names)
    total = len(jobs) * jobs[0].n
    if total > MAX_N or total * jobs[0].max_new_chars > jobs[0].char_limit():
        raise OpenAIError(f"{len(jobs)} prompts x n={jobs[0].n} x max_tokens={jobs[0].max_new_chars}: at most "
                          f"{MAX_N} choices and {jobs[0].char_limit()} characters per request", "prompt")
    generations: list[Generation] = []
    # All are valid and share n, so only the first start can refuse (n over the batch size); a later one fails
    # only when the batcher closes, which ends every queued request itself.
    for job in jobs:
        generations += plane.generate(runtime, job, names, logprobs=logprobs,
                                      prompt_logprobs=echo and logprobs is not None)
    prompt_tokens = sum(count_tokens(vocab, p) for p in prompts)
    return Job(runtime, vocab, prompts, jobs[0].n, generations, prompt_tokens, stream, include_usage,
               logprobs, chat, echo)


async def answer(job: Job, record: metrics.RequestMetrics) -> HttpResponse:
    """Wait for the first chunk (a request that cannot start gets its error status), then the whole answer or
    its event stream."""
    stream_metrics = metrics.StreamMetrics(job.runtime).start()
    chunks = read_chunks(job.generations)
    try:
        first = await anext(chunks)
    except BaseException:
        stream_metrics.stop()
        await chunks.aclose()
        raise
    stream_metrics.chars(len(first.text))
    ident = ("chatcmpl-" if job.chat else "cmpl-") + secrets.token_hex(12)
    base = {"id": ident, "object": "chat.completion.chunk" if job.chat else "text_completion",
            "created": int(time.time()), "model": job.runtime.name, "system_fingerprint": job.runtime.tag}
    if job.stream:
        return HttpResponse(event_stream(job, first, chunks, base, record, stream_metrics), content_type=SSE,
                            headers=[(b"cache-control", b"no-cache")])
    texts: list[list[str]] = [[] for _ in job.generations]
    scores: list[list[TokenLogprob]] = [[] for _ in job.generations]
    reasons: list[str | None] = [None] * len(job.generations)
    try:
        chunk: Chunk | None = first
        while chunk is not None:
            texts[chunk.index].append(chunk.text)
            scores[chunk.index] += chunk.logprobs
            reasons[chunk.index] = chunk.finish_reason or reasons[chunk.index]
            chunk = await anext(chunks, None)
            if chunk is not None:
                stream_metrics.chars(len(chunk.text))
    finally:
        stream_metrics.stop()
        await chunks.aclose()
    vocab = job.vocab
    choices, completion_tokens = [], 0
    for i, parts in enumerate(texts):
        text = "".join(parts)
        completion_tokens += count_tokens(vocab, text)
        if job.chat:
            choices.append({"index": i, "message": {"role": "assistant", "content": text, "refusal": None},
                            "logprobs": chat_logprobs(scores[i]) if job.logprobs is not None else None,
                            "finish_reason": reasons[i] or "length"})
        else:
            prompt = job.prompts[i // job.n]
            logprobs = None
            if job.logprobs is not None:
                head = [completion_logprobs(job.generations[i].prompt_logprobs or [], 0)] if job.echo else []
                logprobs = merge_completion_logprobs([*head, completion_logprobs(scores[i], len(prompt))])
            choices.append({"index": i, "text": prompt + text if job.echo else text, "logprobs": logprobs,
                            "finish_reason": reasons[i] or "length"})
    record.finish(200)
    return json_response(base | {"object": "chat.completion" if job.chat else "text_completion", "choices": choices,
                                 "usage": usage(job.prompt_tokens, completion_tokens)})


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def sse(data: dict | str) -> bytes:
    return b"data: " + (data.encode() if isinstance(data, str) else orjson.dumps(data)) + b"\n\n"


async def event_stream(job: Job, first: Chunk, chunks: AsyncGenerator[Chunk, None], base: dict,
                       record: metrics.RequestMetrics, stream_metrics: metrics.StreamMetrics
                       ) -> AsyncGenerator[bytes, None]:
    """OpenAI's chunk objects: per choice its text as it comes (chat: a first delta with the role), then a chunk
    with its finish_reason; with include_usage, ``usage: null`` on each and a last chunk of usage only; then
    ``data: [DONE]``. A failure mid-stream is an error object event (what OpenAI's clients raise)."""
    status, vocab = 500, job.vocab
    extra = {"usage": None} if job.include_usage else {}
    offsets = [len(job.prompts[i // job.n]) for i in range(len(job.generations))]  # legacy logprobs' text_offset
    completion_tokens, started = 0, [False] * len(job.generations)

    def event(index: int, text: str | None, logprobs: list[TokenLogprob], reason: str | None) -> bytes:
        if job.chat:
            delta: dict = {} if text is None else {"content": text}
            if not started[index]:
                delta = {"role": "assistant", "content": "", "refusal": None} | delta
                started[index] = True
            choice = {"index": index, "delta": delta, "finish_reason": reason,
                      "logprobs": chat_logprobs(logprobs) if job.logprobs is not None and text is not None else None}
        else:
            lp = None
            if job.logprobs is not None and text is not None:
                lp = completion_logprobs(logprobs, offsets[index])
                offsets[index] += len(text)
            choice = {"index": index, "text": text or "", "logprobs": lp, "finish_reason": reason}
        return sse(base | {"choices": [choice]} | extra)

    try:
        if job.echo:
            for index in range(len(job.generations)):
                prompt = job.prompts[index // job.n]
                head = job.generations[index].prompt_logprobs if job.logprobs is not None else None
                yield sse(base | {"choices": [{"index": index, "text": prompt, "finish_reason": None,
                                               "logprobs": completion_logprobs(head or [], 0) if head is not None
                                               else None}]} | extra)
        chunk: Chunk | None = first
        while chunk is not None:
            completion_tokens += count_tokens(vocab, chunk.text)
            if chunk.text or (job.chat and not started[chunk.index]):
                yield event(chunk.index, chunk.text, chunk.logprobs, None)
            if chunk.finish_reason is not None:
                yield event(chunk.index, None, [], chunk.finish_reason)
            chunk = await anext(chunks, None)
            if chunk is not None:
                stream_metrics.chars(len(chunk.text))
        if job.include_usage:
            yield sse(base | {"choices": [], "usage": usage(job.prompt_tokens, completion_tokens)})
        yield sse("[DONE]")
        status = 200
    except (GeneratorExit, asyncio.CancelledError):
        status = 499  # the client went away: closing ``chunks`` below frees every slot at once
        raise
    except Exception as e:
        log.error("openai stream failed", exc_info=e)
        yield sse(error_object(500, f"generation failed: {e}"))
    finally:
        await chunks.aclose()
        stream_metrics.stop()
        record.finish(status)


