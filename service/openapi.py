"""OpenAPI for the routes nnserve serves itself (REST and KServe v2), merged into BentoML's own document so
the one page at ``/`` documents every endpoint. Hand-written: these routes are plain Starlette, which
generates no schema."""

from __future__ import annotations

from typing import Any

from service.generation import MAX_N, MAX_NEW_CHARS, MAX_PROMPT_CHARS, MAX_STOP_CHARS, MAX_STOPS, MAX_STREAM_CHARS

DEFAULT_MODEL = "{} of GET /models; default: the first such model in models.yaml"
VERSION = {"type": "string", "description": "a served version of the model (GET /models lists them); default: "
                                            "the model's traffic split, else its newest version"}

ERROR = {"description": "The problem, named: `{\"error\": \"...\"}` (503 adds Retry-After)",
         "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
ERRORS: dict[str, Any] = {str(code): ERROR for code in (400, 404, 413, 415, 503)}


def form(properties: dict, required: list[str]) -> dict:
    return {"required": True, "content": {"multipart/form-data": {"schema": {
        "type": "object", "properties": properties, "required": required}}}}


IMAGE = {"type": "string", "format": "binary",
         "description": "The image file's bytes (PNG, JPEG, GIF, BMP, TIFF, WebP, ...); URLs are never fetched"}

PATHS: dict[str, Any] = {
    "/classify": {"post": {
        "summary": "Classify an image", "tags": ["REST"],
        "description": "The top_k labels with softmax probabilities, highest first. Preprocessing is the model's "
                       "training transform, read from its store metadata. "
                       "`curl -F image=@digit.png -F top_k=3 localhost:3000/classify`",
        "requestBody": form({"image": IMAGE,
                             "model": {"type": "string", "description": DEFAULT_MODEL.format("an image model")},
                             "version": VERSION,
                             "top_k": {"type": "integer", "minimum": 1, "default": 5}}, ["image"]),
        "responses": {"200": {"description": "`model` (name:version), `predictions` [{label, probability}], "
                                             "`batch_size`, `timings_ms`",
                              "content": {"application/json": {"schema": {"type": "object"}}}}, **ERRORS}}},
    "/features": {"post": {
        "summary": "FC7 feature vector of an image", "tags": ["REST"],
        "description": "the model's embedding (4096 floats for vgg_fc7); `format=npy` answers a float32 .npy file.",
        "requestBody": form({"image": IMAGE,
                             "model": {"type": "string", "description": DEFAULT_MODEL.format("a feature extractor")},
                             "version": VERSION,
                             "normalize": {"type": "boolean", "default": False, "description": "L2-normalise"},
                             "format": {"type": "string", "enum": ["json", "npy"], "default": "json"}}, ["image"]),
        "responses": {"200": {"description": "`model`, `dim`, `features`, `batch_size`, `timings_ms` (or .npy)",
                              "content": {"application/json": {"schema": {"type": "object"}},
                                          "application/x-npy": {}}}, **ERRORS}}},
    "/generate": {"post": {
        "summary": "Continue a prompt character by character", "tags": ["REST"],
        "description": "Continuous batching across concurrent requests; same seed, same text. With "
                       "`stream: true` the characters arrive as chunked text/plain, or as Server-Sent Events "
                       "with `Accept: text/event-stream` (an `end` event closes the stream). `n` > 1: n samples "
                       "decoded together, sample i seeded `seed + i`; the answer's `choices` holds one "
                       "`{index, text, finish_reason}` per sample, and a stream (Server-Sent Events only) sends "
                       "`choice` events `{index, text, finish_reason?}` (docs/generation.md).",
        "requestBody": {"required": True, "content": {"application/json": {"schema": {
            "type": "object", "additionalProperties": False, "required": ["prompt"], "properties": {
                "prompt": {"type": "string", "minLength": 1, "maxLength": MAX_PROMPT_CHARS},
                "max_new_chars": {"type": "integer", "minimum": 1, "maximum": MAX_STREAM_CHARS, "default": 200,
                                  "description": f"per sample; n x max_new_chars <= {MAX_NEW_CHARS}, or "
                                                 f"{MAX_STREAM_CHARS} with stream: true"},
                "n": {"type": "integer", "minimum": 1, "maximum": MAX_N, "default": 1,
                      "description": "samples of the prompt, decoded together; sample i is seeded seed + i"},
                # OpenAPI 3.0 (BentoML's document): exclusiveMinimum is a flag on minimum, null is `nullable`.
                "temperature": {"type": "number", "minimum": 0, "default": 1.0, "description": "0 = greedy"},
                "top_k": {"type": "integer", "nullable": True, "minimum": 1, "default": None},
                "top_p": {"type": "number", "nullable": True, "minimum": 0, "exclusiveMinimum": True, "maximum": 1,
                          "default": None, "description": "nucleus sampling (after top_k)"},
                "seed": {"type": "integer", "nullable": True, "minimum": 0, "default": None},
                "stop": {"nullable": True, "default": None, "description": "the text ends before the first one met",
                         "oneOf": [{"type": "string", "minLength": 1, "maxLength": MAX_STOP_CHARS},
                                   {"type": "array", "minItems": 1, "maxItems": MAX_STOPS, "items": {
                                       "type": "string", "minLength": 1, "maxLength": MAX_STOP_CHARS}}]},
                "model": {"type": "string", "description": DEFAULT_MODEL.format("a text model")},
                "version": VERSION,
                "stream": {"type": "boolean", "default": False}}}}}},
        "responses": {"200": {"description": "`{model, text, seed, finish_reason, choices, timings_ms}` "
                                             "(finish_reason: length or stop; choices: [{index, text, "
                                             "finish_reason}]; n > 1: no top-level text or finish_reason), or the "
                                             "stream",
                              "content": {"application/json": {"schema": {"type": "object"}},
                                          "text/plain": {}, "text/event-stream": {}}}, **ERRORS}}},
    "/models": {"get": {
        "summary": "Every served model", "tags": ["REST"],
        "description": "Version, store tag, kind, state (loading / ready / failed with the reason), execution "
                       "provider, tensors, parity certificate, labels or vocabulary size.",
        "responses": {"200": {"description": "`{models: [...]}`"}}}},
    "/v2/models/{name}/infer": {"post": {
        "summary": "KServe v2 / Open Inference Protocol inference", "tags": ["KServe v2"],
        "description": "JSON tensors or Triton's binary tensor extension (Inference-Header-Content-Length). "
                       "`{name}` is a served model (its network's tensors, as GET /v2/models/{name} lists "
                       "them) or a model's front end: `<model>.image` takes `image` (BYTES [N, 1] or [N]: "
                       "encoded files, as /classify), `<model>.text` takes `text_input` (BYTES [1]) and "
                       "answers `text_output`. Classifiers answer Triton's classification extension "
                       "(`parameters.classification: K` on an output: BYTES `value:index:label`, value = the "
                       "raw output). "
                       "Also: GET /v2, /v2/health/live, /v2/health/ready, /v2/models/{name}[/ready], "
                       "/v2/models/{name}/versions/{version}/...; gRPC on NNSERVE_GRPC_PORT (docs/kserve.md).",
        "parameters": [{"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}],
        "requestBody": {"required": True, "content": {"application/json": {"schema": {"type": "object"}},
                                                      "application/octet-stream": {}}},
        "responses": {"200": {"description": "`{model_name, model_version, outputs: [...]}`"}, **ERRORS}}},
}

GENERATE_BODY: dict[str, Any] = {"required": True, "content": {"application/json": {"schema": {
    "type": "object", "required": ["text_input"], "properties": {
        "text_input": {"type": "string", "minLength": 1, "maxLength": MAX_PROMPT_CHARS},
        "id": {"type": "string"},
        "parameters": {"type": "object", "additionalProperties": False, "properties": {
            "max_tokens": {"type": "integer", "minimum": 1, "maximum": MAX_STREAM_CHARS, "default": 200,
                           "description": f"per sample; n x max_tokens <= {MAX_NEW_CHARS} ({MAX_STREAM_CHARS} in "
                                          "generate_stream)"},
            "n": {"type": "integer", "minimum": 1, "maximum": MAX_N, "default": 1,
                  "description": "samples, decoded together; sample i is seeded seed + i"},
            "temperature": {"type": "number", "minimum": 0, "default": 1.0, "description": "0 = greedy"},
            "top_k": {"type": "integer", "minimum": 1}, "top_p": {"type": "number", "minimum": 0,
                                                                  "exclusiveMinimum": True, "maximum": 1},
            "seed": {"type": "integer", "minimum": 0},
            "stop": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]}}}},
    "description": "The sampling options may also be top-level keys (Triton maps those to inputs)."}}}}
MODEL: list[dict] = [{"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}]
PATHS["/v2/models/{name}/generate"] = {"post": {
    "summary": "Triton's generate extension: a text model's whole answer", "tags": ["KServe v2"],
    "description": "The continuous batcher of /generate, on a text model's front end (`char_lstm.text`) or the "
                   "model itself. Also /v2/models/{name}/versions/{version}/generate; over gRPC, "
                   "ModelStreamInfer with a BYTES text_input to `<model>.text` streams the same (docs/kserve.md).",
    "parameters": MODEL, "requestBody": GENERATE_BODY,
    "responses": {"200": {"description": "`{model_name, model_version, text_output, finish_reason, id?}`; with "
                                         "n > 1 text_output and finish_reason are lists, one element per sample"},
                  **ERRORS}}}
PATHS["/v2/models/{name}/generate_stream"] = {"post": {
    "summary": "Triton's generate extension, streamed", "tags": ["KServe v2"],
    "description": "Server-Sent Events: `data: {model_name, model_version, text_output}` per chunk, each "
                   "sample's last with `finish_reason`, and with n > 1 `sequence_index` (the sample) in every "
                   "event; a failure after the first chunk is a last `data: {error}`.",
    "parameters": MODEL, "requestBody": GENERATE_BODY,
    "responses": {"200": {"description": "the event stream", "content": {"text/event-stream": {}}}, **ERRORS}}}


def merge(base: dict) -> dict:
    """BentoML's document plus our paths and the Error schema."""
    spec = {**base, "paths": {**base.get("paths", {}), **PATHS}}
    components = dict(spec.get("components", {}))
    components["schemas"] = {**components.get("schemas", {}), "Error": {
        "type": "object", "properties": {"error": {"type": "string"}}, "required": ["error"]}}
    spec["components"] = components
    return spec
