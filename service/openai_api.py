"""OpenAI's API over the text models: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions``.

A thin codec: a request becomes one ``GenerationRequest`` per prompt, validated by the same code as
``/generate`` (``GenerationRequest.validate``, parameters mapped by the model kind's ``sampling_options``),
and queued on the same continuous batcher (``Repository.generator``); the chunks become OpenAI's objects.
Streams are server-sent events of ``text_completion`` / ``chat.completion.chunk`` objects ended by
``data: [DONE]``; errors are OpenAI's error object with the status OpenAI uses (docs/openai.md).

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
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping
from dataclasses import dataclass

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from models.kinds import kinds_for
from models.kinds.base import RequestError
from models.vocab import Vocabulary, VocabularyError
from service import metrics
from service.errors import ClientError, NotFound, Unavailable
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
from service.repository import Repository
from service.runtime import ModelRuntime
from service.uploads import read_limited

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
    """A ClientError with OpenAI's ``param`` and ``code``."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None, status: int = 400) -> None:
        super().__init__(message)
        self.param, self.code, self.status = param, code, status


def error_object(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    """OpenAI's error body: ``{"error": {"message", "type", "param", "code"}}``, its type by status."""
    kind = {401: "authentication_error", 403: "permission_error", 404: "invalid_request_error",
            429: "rate_limit_error", 503: "service_unavailable"}.get(status)
    kind = kind or ("invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(record: metrics.RequestMetrics | None, error: Exception, params: tuple[str, ...] = ()
                   ) -> JSONResponse:
    """The error object for a failed request, counted by outcome; ``params``: the names a ClientError's message
    may start with (the first one it starts with becomes ``param``)."""
    param = code = None
    if isinstance(error, ClientError):
        status, message = error.status, str(error)
        param, code = getattr(error, "param", None), getattr(error, "code", None)
        if param is None:
            param = next((p for p in params if re.match(rf"{re.escape(p)}\b", message)), None)
        log.debug("openai: %d %s", status, message)
    else:
        status, message = 500, f"internal error: {type(error).__name__}: {error}"
        log.error("openai request failed", exc_info=error)
    if record is not None:
        record.finish(status)
    retry_after = getattr(error, "retry_after", None)
    return JSONResponse(error_object(status, message, param, code), status_code=status,
                        headers={"Retry-After": str(retry_after)} if retry_after else None)


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


def text_models(repository: Repository) -> list[str]:
    """The served models that generate text (ready or loading), in config order."""
    kinds = kinds_for("/generate")
    return [name for name in repository.names() if repository.kinds.get(name) in kinds]


def resolve_model(repository: Repository, model: object) -> ModelRuntime:
    """The runtime for OpenAI's ``model``: ``name`` or ``name:version``. Unknown: 404 listing the text models."""
    if not isinstance(model, str):
        raise OpenAIError(f"model must be a string, got {type(model).__name__}", "model")
    name, _, version = model.partition(":")
    served = text_models(repository)
    if name not in repository.names():
        raise OpenAIError(f"The model {model[:100]!r} does not exist; served models: {', '.join(served) or 'none'}",
                          "model", "model_not_found", status=404)
    try:
        return repository.model_for(name, "/generate", version)
    except NotFound as e:  # an unknown version
        raise OpenAIError(str(e), "model", "model_not_found", status=404) from e
    except Unavailable:
        raise
    except ClientError as e:  # a model of another kind
        raise OpenAIError(f"model {name!r} does not generate text; served text models: {', '.join(served)}",
                          "model", "model_not_found", status=404) from e


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


def create_app(get_repository: Callable[[], Repository]) -> Starlette:
    """The /v1 routes (mounted by the front door, service/front.py)."""

    async def list_models(request: Request) -> Response:
        repository = get_repository()
        return JSONResponse({"object": "list", "data": [model_object(repository, n) for n in text_models(repository)]})

    async def get_model(request: Request) -> Response:
        repository, name = get_repository(), request.path_params["model"]
        if name not in text_models(repository):
            return error_response(None, OpenAIError(f"The model {name[:100]!r} does not exist; served models: "
                                                    f"{', '.join(text_models(repository)) or 'none'}", "model",
                                                    "model_not_found", status=404))
        return JSONResponse(model_object(repository, name))

    async def completions(request: Request) -> Response:
        record = metrics.RequestMetrics("openai_completions")
        try:
            body = parse_body(await read_limited(request, MAX_JSON_BYTES), COMPLETION_FIELDS)
            stream, include_usage = stream_flags(body)
            repository = get_repository()
            runtime = resolve_model(repository, body["model"])
            record.begin(runtime)
            if "prompt" not in body:
                raise OpenAIError("you must provide a prompt parameter", "prompt", "missing_required_parameter")
            prompts = prompts_of(body["prompt"], repository.generator(runtime).vocab)
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
            job = start(repository, runtime, prompts, body, "prompt", COMPLETION_MAX_TOKENS, stream, include_usage,
                        logprobs, chat=False, echo=echo)
            return await answer(job, record)
        except Exception as e:
            return error_response(record, e, COMPLETION_PARAMS)

    async def chat_completions(request: Request) -> Response:
        record = metrics.RequestMetrics("openai_chat")
        try:
            body = parse_body(await read_limited(request, MAX_JSON_BYTES), CHAT_FIELDS)
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
            repository = get_repository()
            runtime = resolve_model(repository, body["model"])
            record.begin(runtime)
            job = start(repository, runtime, [scene.prompt], body, "messages", CHAT_MAX_TOKENS, stream, include_usage,
                        (top or 0) if logprobs else None, chat=True)
            return await answer(job, record)
        except Exception as e:
            return error_response(record, e, CHAT_PARAMS)

    async def not_found(request: Request, exc: Exception) -> Response:
        status = getattr(exc, "status_code", 404)
        message = (f"{request.method[:10]} {request.url.path[:100]} is not served: nnserve answers GET /v1/models, "
                   "POST /v1/completions and POST /v1/chat/completions")
        return JSONResponse(error_object(status, message), status_code=status)

    return Starlette(exception_handlers={404: not_found, 405: not_found}, routes=[
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/models/{model:path}", get_model, methods=["GET"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
    ])


COMPLETION_PARAMS = ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "n", "prompt", "logprobs",
                     "stream", "model")
CHAT_PARAMS = ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "n", "messages", "logprobs",
               "top_logprobs", "stream", "model")


def model_object(repository: Repository, name: str) -> dict:
    return {"id": name, "object": "model", "created": 0, "owned_by": "nnserve"}


def start(repository: Repository, runtime: ModelRuntime, prompts: list[str], body: Mapping, prompt_name: str,
          default_max_tokens: int, stream: bool, include_usage: bool, logprobs: int | None, chat: bool,
          echo: bool = False) -> Job:
    """Validate every prompt's GenerationRequest (the /generate checks), then queue them all on the model's
    continuous batcher; nothing is queued if any is invalid."""
    fields, names = sampling(runtime, body, prompt_name)
    n = fields.get("n", 1)
    if isinstance(n, int) and n >= 1:  # the default fits the per-request character limit (else: n's error)
        default_max_tokens = max(1, min(default_max_tokens, (MAX_STREAM_CHARS if stream else MAX_NEW_CHARS) // n))
    fields.setdefault("max_new_chars", default_max_tokens)
    if fields.get("seed") is None:  # one seed for every prompt: the whole request is reproducible from it
        fields["seed"] = secrets.randbits(63)
    batcher = repository.generator(runtime)
    jobs = [GenerationRequest(prompt=p, model=runtime.name, stream=stream, **fields) for p in prompts]
    for job in jobs:
        job.validate(batcher.vocab, names)
    total = len(jobs) * jobs[0].n
    if total > MAX_N or total * jobs[0].max_new_chars > jobs[0].char_limit():
        raise OpenAIError(f"{len(jobs)} prompts x n={jobs[0].n} x max_tokens={jobs[0].max_new_chars}: at most "
                          f"{MAX_N} choices and {jobs[0].char_limit()} characters per request", "prompt")
    flush = repository.settings.stream_flush_ms / 1e3 if stream else None
    generations: list[Generation] = []
    # All are valid and share n, so only the first submit can refuse (n over the batch size); a later one fails
    # only when the batcher closes, which ends every queued request itself.
    for job in jobs:
        generations += batcher.submit_choices(job, flush, names, logprobs=logprobs,
                                              prompt_logprobs=echo and logprobs is not None)
    prompt_tokens = sum(count_tokens(batcher.vocab, p) for p in prompts)
    return Job(runtime, batcher.vocab, prompts, jobs[0].n, generations, prompt_tokens, stream, include_usage,
               logprobs, chat, echo)


async def answer(job: Job, record: metrics.RequestMetrics) -> Response:
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
        return StreamingResponse(event_stream(job, first, chunks, base, record, stream_metrics),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
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
    return JSONResponse(base | {"object": "chat.completion" if job.chat else "text_completion", "choices": choices,
                                "usage": usage(job.prompt_tokens, completion_tokens)})


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


async def event_stream(job: Job, first: Chunk, chunks: AsyncGenerator[Chunk, None], base: dict,
                       record: metrics.RequestMetrics, stream_metrics: metrics.StreamMetrics) -> AsyncIterator[str]:
    """OpenAI's chunk objects: per choice its text as it comes (chat: a first delta with the role), then a chunk
    with its finish_reason; with include_usage, ``usage: null`` on each and a last chunk of usage only; then
    ``data: [DONE]``. A failure mid-stream is an error object event (what OpenAI's clients raise)."""
    status, vocab = 500, job.vocab
    extra = {"usage": None} if job.include_usage else {}
    offsets = [len(job.prompts[i // job.n]) for i in range(len(job.generations))]  # legacy logprobs' text_offset
    completion_tokens, started = 0, [False] * len(job.generations)

    def event(index: int, text: str | None, logprobs: list[TokenLogprob], reason: str | None) -> str:
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


