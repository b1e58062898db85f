"""Open Inference Protocol (KServe v2) over gRPC: ``inference.GRPCInferenceService`` on a grpc.aio server.

Runs inside the BentoML service process (started from its startup hook). The protobuf messages and the
servicer base class are the generated stubs shipped in tritonclient, so the wire format is Triton's own.
RPCs not served here (shared memory, trace, logging) answer UNIMPLEMENTED with a message listing the ones
that are. Inputs arrive as ``raw_input_contents`` or typed ``contents``; outputs always go back as
``raw_output_contents``, as Triton does. ``ModelStreamInfer`` streams text generation for a prompt sent to
a text model's front end (``char_lstm.text``: Triton's decoupled models, ``triton_final_response``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from typing import TYPE_CHECKING

import grpc
import numpy as np
from google.protobuf import json_format
from tritonclient.grpc import model_config_pb2, service_pb2_grpc
from tritonclient.grpc import service_pb2 as pb

from service import auth, kserve, management, metrics
from service.errors import ClientError, failure_of
from service.kserve import Inputs, RequestTensor, V2Model
from service.repository import request_scope
from service.settings import Settings

if TYPE_CHECKING:
    from service.dataplane import DataPlane

log = logging.getLogger("nnserve.kserve.grpc")

SHARED_MEMORY_PARAMETERS = ("shared_memory_region", "shared_memory_byte_size", "shared_memory_offset")
# gRPC core cancels calls that arrive faster than the application takes them: past
# ``grpc.server.max_pending_requests`` (default 1000) calls not yet handed to a handler it drops a rising
# share of new ones, all of them past the hard limit (default 3000), each with a bare CANCELLED that no client
# asked for (3,000 concurrent ModelInfer calls on one channel: ~450 CANCELLED, with a bare grpc.aio server as
# with ours). The admission limit is the overload answer here (UNAVAILABLE naming it), so gRPC core's
# backlog is raised far past what the event loop takes: a call waits for its handler and is admitted or
# refused with the reason. A pending call holds a few kilobytes; its message is read by its handler.
MAX_PENDING_CALLS = 100_000


def failure(exc: BaseException, where: str) -> tuple[grpc.StatusCode, str]:
    """The error model's gRPC code and message (service/errors.py)."""
    found = failure_of(exc, f"KServe v2 gRPC {where}")
    return grpc.StatusCode[found.grpc_code], found.message


def rpc(method):
    """Run a unary RPC in a request scope and turn its exceptions into gRPC status codes with the message
    as details."""
    @functools.wraps(method)
    async def wrapper(self, request, context: grpc.aio.ServicerContext):
        try:
            with request_scope(metadata_of(context)):
                return await method(self, request, context)
        except Exception as e:
            code, details = failure(e, method.__name__)
        await context.abort(code, details)  # raises; never returns

    return wrapper


def metadata_of(context: grpc.aio.ServicerContext) -> dict[str, str]:
    """The call's metadata as request headers (lower-case keys; a sticky traffic split reads one)."""
    return {key.lower(): value for key, value in (context.invocation_metadata() or ()) if isinstance(value, str)}


def reject_shared_memory(parameters, where: str) -> None:
    for key in SHARED_MEMORY_PARAMETERS:
        if key in parameters:
            raise ClientError(f"{where}: shared memory is not supported by this server; send the data inline")


def decode_inputs(target: V2Model, request: pb.ModelInferRequest, settings: Settings | None = None) -> Inputs:
    """Check the described inputs against the model and the request limits of ``settings``, then decode raw
    or typed contents."""
    if not request.inputs:
        raise ClientError("ModelInferRequest has no inputs")
    tensors = [RequestTensor(t.name, t.datatype, list(t.shape)) for t in request.inputs]
    for t in request.inputs:
        reject_shared_memory(t.parameters, f"input {t.name!r}")
    kserve.check_header(target, tensors, settings)
    raw = request.raw_input_contents
    if raw and len(raw) != len(tensors):
        raise ClientError(f"raw_input_contents has {len(raw)} entries for {len(tensors)} inputs; "
                          "give every input raw, or none")
    inputs = Inputs(target.front)
    for i, (t, message) in enumerate(zip(tensors, request.inputs, strict=True)):
        if raw:
            inputs.add_raw(t, raw[i])
            continue
        field = "bytes_contents" if t.datatype == kserve.BYTES else kserve.DATATYPES[t.datatype][1]
        if field is None:
            raise ClientError(f"input {t.name!r} is {t.datatype}, which only raw_input_contents can carry")
        inputs.add_values(t, list(getattr(message.contents, field)))
    return inputs


def requested_outputs(target: V2Model, request: pb.ModelInferRequest) -> tuple[list[str], dict[str, int]]:
    """Output names, and output -> class count of those asked with ``parameters["classification"]``."""
    classes = {}
    for out in request.outputs:
        reject_shared_memory(out.parameters, f"output {out.name!r}")
        if "classification" in out.parameters:
            classes[out.name] = parameter_value(out.parameters["classification"])
    names = kserve.select_outputs(target, [out.name for out in request.outputs])
    return names, {name: kserve.check_classification(target, name, count) for name, count in classes.items()}


def parameter_value(parameter: pb.InferParameter) -> object:
    """The Python value of an InferParameter (whichever of its oneof fields is set)."""
    field = parameter.WhichOneof("parameter_choice")
    return None if field is None else getattr(parameter, field)


def repository_parameters(parameters) -> dict:
    """RepositoryModelLoad/Unload parameters (ModelRepositoryParameter: bool, int64, string or bytes)."""
    out = {}
    for key, value in parameters.items():
        field = value.WhichOneof("parameter_choice")
        out[key] = None if field is None else getattr(value, field)
    return out


def request_parameters(request: pb.ModelInferRequest) -> dict:
    return {key: parameter_value(value) for key, value in request.parameters.items()}


def text_response(target: V2Model, request: pb.ModelInferRequest, text: str | None, final: bool,
                  sequence_index: int | None = None, finish_reason: str | None = None) -> pb.ModelInferResponse:
    """One response of a streamed generation: a BYTES ``text_output`` [1] (none in an empty final
    response), Triton's ``triton_final_response`` flag, and as parameters the sample it belongs to
    (``sequence_index``, when n > 1) and, on a sample's last chunk, its ``finish_reason``."""
    response = pb.ModelInferResponse(model_name=target.name, model_version=target.version, id=request.id)
    if text is not None:
        name = kserve.output_names(target)[0]
        response.outputs.add(name=name, datatype=kserve.BYTES, shape=[1])
        response.raw_output_contents.append(kserve.serialize_bytes(np.array([text.encode()], dtype=object)))
    response.parameters["triton_final_response"].bool_param = final
    if sequence_index is not None:
        response.parameters["sequence_index"].int64_param = sequence_index
    if finish_reason is not None:
        response.parameters["finish_reason"].string_param = finish_reason
    return response


class InferenceServicer(service_pb2_grpc.GRPCInferenceServiceServicer):
    """The gRPC codec over the data plane (service/dataplane.py): one short method per RPC."""

    def __init__(self, plane: DataPlane) -> None:
        self.plane = plane
        self.repository = plane.repository  # the management RPCs' operations take it (service/management.py)

    @rpc
    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    @rpc
    async def ServerReady(self, request, context):
        """The data plane's readiness: the same answer as /readyz and /v2/health/ready."""
        return pb.ServerReadyResponse(ready=self.plane.readiness().ready)

    @rpc
    async def ModelReady(self, request, context):
        """ready=false for a model (or version) that is not served, loading or unloaded, as Triton answers."""
        try:
            kserve.resolve(self.plane, request.name, request.version)
        except ClientError:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=True)

    @rpc
    async def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(**kserve.server_metadata())

    @rpc
    async def ModelMetadata(self, request, context):
        target = kserve.resolve(self.plane, request.name, request.version)
        meta = kserve.model_metadata(target, self.plane.served_versions(target.runtime.name))
        return pb.ModelMetadataResponse(
            name=meta["name"], versions=meta["versions"], platform=meta["platform"],
            inputs=[pb.ModelMetadataResponse.TensorMetadata(**t) for t in meta["inputs"]],
            outputs=[pb.ModelMetadataResponse.TensorMetadata(**t) for t in meta["outputs"]])

    # -- management: Triton's model-repository extension, configuration and statistics ------------------------

    @rpc
    async def RepositoryIndex(self, request, context):
        entries = await asyncio.to_thread(management.index, self.repository, request.ready)
        return pb.RepositoryIndexResponse(models=[pb.RepositoryIndexResponse.ModelIndex(**e) for e in entries])

    @rpc
    async def RepositoryModelLoad(self, request, context):
        await asyncio.to_thread(management.load, self.repository, request.model_name,
                                repository_parameters(request.parameters))
        return pb.RepositoryModelLoadResponse()

    @rpc
    async def RepositoryModelUnload(self, request, context):
        await asyncio.to_thread(management.unload, self.repository, request.model_name,
                                repository_parameters(request.parameters))
        return pb.RepositoryModelUnloadResponse()

    @rpc
    async def ModelConfig(self, request, context):
        config = management.model_config(self.repository, request.name, request.version)
        if "specific" in config["version_policy"]:  # the proto's versions are int64, store versions are strings:
            del config["version_policy"]  # the served ones are in parameters.served_versions
        return pb.ModelConfigResponse(config=json_format.ParseDict(config, model_config_pb2.ModelConfig()))

    @rpc
    async def ModelStatistics(self, request, context):
        stats = await asyncio.to_thread(management.model_statistics, self.repository, request.name, request.version)
        return json_format.ParseDict(stats, pb.ModelStatisticsResponse())

    async def infer(self, request: pb.ModelInferRequest, endpoint: str) -> pb.ModelInferResponse:
        """One admitted inference request, counted under ``endpoint``; a prompt answers its whole text."""
        record = metrics.RequestMetrics(endpoint)
        status = 500
        try:
            target = kserve.resolve(self.plane, request.model_name, request.model_version)
            record.begin(target)  # a front end's requests count under its own name
            inputs = decode_inputs(target, request, self.plane.settings)
            names, classes = requested_outputs(target, request)
            prompt = target.front is not None and target.front.role == "prompt"
            outputs = await kserve.infer(self.plane, target, inputs, names, record, classes,
                                         request_parameters(request) if prompt else None)
            status = 200
        except ClientError as e:
            status = e.status
            raise
        finally:
            record.finish(status)
        response = pb.ModelInferResponse(model_name=target.name, model_version=target.version, id=request.id)
        for name, array in outputs.items():
            response.outputs.add(name=name, datatype=kserve.kserve_datatype(array.dtype), shape=list(array.shape))
            response.raw_output_contents.append(  # tobytes() is C order, whatever the layout
                kserve.serialize_bytes(array) if array.dtype == object else array.tobytes())
        return response

    @rpc
    async def ModelInfer(self, request, context):
        self.plane.admit()  # past the limit: UNAVAILABLE naming it, before the request is decoded
        try:
            return await self.infer(request, "grpc")
        finally:
            self.plane.release()

    async def ModelStreamInfer(self, request_iterator, context):
        """Bidirectional stream (tritonclient's start_stream). A prompt (``text_input``) on a text front end
        streams a response per chunk, the continuous batcher's as /generate's (Triton's decoupled models);
        any other request gets one response. Requests run concurrently, their responses interleaved (each
        carries its request's id). A bad request answers with ``error_message`` and the stream goes on, as
        Triton does. When the client closes the stream, every generation in it is closed at once (its batch
        slot freed)."""
        responses: asyncio.Queue = asyncio.Queue()
        headers = metadata_of(context)
        done = object()
        tasks: set[asyncio.Task] = set()

        async def read_requests() -> None:
            try:
                async for request in request_iterator:
                    task = asyncio.create_task(self.stream_one(request, responses.put_nowait, headers))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                while tasks:
                    await asyncio.wait(list(tasks))
            finally:
                responses.put_nowait(done)

        reader = asyncio.create_task(read_requests())
        try:
            while (item := await responses.get()) is not done:
                yield item
        finally:  # the client went away (or the stream ended): stop everything it started
            reader.cancel()
            for task in list(tasks):
                task.cancel()
            await asyncio.gather(reader, *tasks, return_exceptions=True)

    async def stream_one(self, request: pb.ModelInferRequest, send, headers: dict[str, str]) -> None:
        """One request of a stream: its responses (or its error) go to ``send``; the version it runs on stays
        loaded until its last response (request_scope), not for the whole stream."""
        admitted = False
        try:
            with request_scope(headers):
                self.plane.admit()  # each request of a stream takes its own slot: a stream is not a free queue
                admitted = True
                await self.stream_request(request, send)
        except Exception as e:
            send(pb.ModelStreamInferResponse(error_message=failure(e, "ModelStreamInfer")[1],
                                             infer_response=pb.ModelInferResponse(id=request.id)))
        finally:
            if admitted:
                self.plane.release()

    async def stream_request(self, request: pb.ModelInferRequest, send) -> None:
        target = kserve.resolve(self.plane, request.model_name, request.model_version)
        if target.front is None or target.front.role != "prompt":
            send(pb.ModelStreamInferResponse(infer_response=await self.infer(request, "grpc_stream")))
            return
        inputs = decode_inputs(target, request, self.plane.settings)
        kserve.select_outputs(target, [out.name for out in request.outputs])
        parameters = request_parameters(request)
        empty_final = parameters.get("triton_enable_empty_final_response") is True
        runtime = target.runtime
        _, generations = kserve.start_generation(self.plane, runtime, inputs.rows[0], parameters, stream=True)
        several = len(generations) > 1
        left = len(generations)  # samples not finished: the final flag goes on the last one's last chunk
        ended: tuple[int | None, str | None] = (None, None)  # an empty last chunk left to the final response
        async with contextlib.aclosing(kserve.chunks(runtime, generations)) as parts:
            async for index, text, reason in parts:
                left -= reason is not None
                last = not left
                if text or reason is not None and not (last and empty_final):
                    send(pb.ModelStreamInferResponse(infer_response=text_response(
                        target, request, text, last and not empty_final, index if several else None, reason)))
                elif last:
                    ended = (index if several else None, reason)
        if empty_final:  # Triton's empty final response: no outputs, the flag (and a finish_reason not yet sent)
            send(pb.ModelStreamInferResponse(infer_response=text_response(target, request, None, True, *ended)))


def add_unimplemented_rpcs(servicer_class: type) -> None:
    """Give the RPCs we do not serve a clear UNIMPLEMENTED message (the generated base class answers
    UNIMPLEMENTED too, but with "Unexpected NotImplementedError" as the message)."""
    served = [name for name in pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods_by_name
              if name in servicer_class.__dict__]
    for name in pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods_by_name:
        if name in servicer_class.__dict__:
            continue

        async def unimplemented(self, request, context, name=name):
            await context.abort(grpc.StatusCode.UNIMPLEMENTED,
                                f"{name} is not implemented by this server; it serves {', '.join(served)}")

        setattr(servicer_class, name, unimplemented)


add_unimplemented_rpcs(InferenceServicer)


async def start_grpc_server(plane: DataPlane, host: str, port: int, max_request_bytes: int,
                            lock: auth.Lock | None = None) -> grpc.aio.Server:
    """Start serving on ``host:port`` (the HTTP server's address unless NNSERVE_GRPC_HOST says otherwise).
    SO_REUSEPORT lets every BentoML worker bind the same port; the kernel spreads connections across them.
    ``lock`` checks every call's token before its handler runs (None: a lock with no token, so the
    management RPCs are off and the rest open)."""
    server = grpc.aio.server(interceptors=[auth.GrpcLock(lock or auth.Lock())], options=[
        ("grpc.so_reuseport", 1),
        ("grpc.max_receive_message_length", max_request_bytes),
        ("grpc.max_send_message_length", -1),
        ("grpc.server.max_pending_requests", MAX_PENDING_CALLS),
        ("grpc.server.max_pending_requests_hard_limit", 2 * MAX_PENDING_CALLS),
    ])
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(plane), server)
    wildcard = host in ("", "0.0.0.0", "::")
    addresses = (f"[::]:{port}", f"0.0.0.0:{port}") if wildcard else (f"[{host}]:{port}" if ":" in host
                                                                       else f"{host}:{port}",)
    for address in addresses:  # [::] also takes IPv4; 0.0.0.0 for hosts without IPv6
        try:
            server.add_insecure_port(address)
            break
        except RuntimeError as e:
            bind_error = e
    else:
        raise RuntimeError(f"KServe v2 gRPC cannot listen on port {port}; is a process that did not set "
                           "SO_REUSEPORT (or a different server) holding it?") from bind_error
    await server.start()
    log.info("KServe v2 gRPC (inference.GRPCInferenceService) listening on %s", address)
    return server
