"""The data plane under every front end (service/dataplane.py).

Readiness: ``/readyz``, ``/v2/health/ready`` and gRPC ``ServerReady`` render one answer, so they agree in
every state; the first test steps through the states one worker goes through (gRPC not listening yet, a
model waiting for its export, everything served) with the real front door, codecs, gRPC server and
repository in this process, since a served worker accepts no HTTP request before its gRPC server listens.

Admission: the concurrency limit applies to gRPC as to REST. Many concurrent gRPC calls past a low limit
on a real server get UNAVAILABLE naming the limit, and none a bare CANCELLED (gRPC core's own backlog
protection cancelled calls it had not yet handed to the application: service/kserve_grpc.py).
"""

from __future__ import annotations

import asyncio
import collections
import json
import time
import uuid

import grpc
import httpx
import numpy as np
import pytest
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

from harness.server import free_port
from loadtest.faults import store_copy
from service.dataplane import GRPC_NOT_LISTENING, DataPlane
from service.front import FrontDoor
from service.kserve_grpc import start_grpc_server
from service.kserve_http import KServeHttp
from service.lifecycle import StateDir
from service.repository import Repository
from service.rest import RestApi
from service.settings import Settings

pytestmark = pytest.mark.integration


async def three_answers(client: httpx.AsyncClient, port: int) -> tuple[tuple[int, dict], tuple[int, dict], bool | str]:
    """(/readyz status and body, /v2/health/ready status and body, ServerReady's answer or the gRPC error code)."""
    readyz = await client.get("/readyz")
    v2 = await client.get("/v2/health/ready")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            ready = (await service_pb2_grpc.GRPCInferenceServiceStub(channel).ServerReady(
                pb.ServerReadyRequest(), timeout=2)).ready
        except grpc.aio.AioRpcError as e:
            ready = e.code().name
    return (readyz.status_code, readyz.json()), (v2.status_code, v2.json()), ready


def test_readyz_v2_ready_and_grpc_server_ready_agree_in_every_state(tiny_store, tmp_path):
    soon = f"soon-{uuid.uuid4().hex[:8]}"  # not in the store yet: the model waits for its export
    config = tmp_path / "models.json"
    config.write_text(json.dumps({"models": {"lenet5": {"tag": tiny_store["lenet5"]}, "soon": {"tag": soon}}}))
    settings = Settings.from_env({"NNSERVE_MODELS_CONFIG": str(config)})
    repository = Repository(settings, StateDir(tmp_path / "state", settings), worker=1)
    plane = DataPlane(repository)
    repository.start_loading()
    repository.loaded.wait(120)
    bentoml_stand_in = Starlette()
    bentoml_stand_in.add_route("/{path:path}", lambda request: PlainTextResponse("bentoml", 404))
    door = FrontDoor(bentoml_stand_in, RestApi(lambda: plane, dict).router(), KServeHttp(lambda: plane).router(),
                     lambda: plane)
    port = free_port()

    async def steps() -> None:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=door), base_url="http://test") as client:
            # 1. gRPC not listening yet, a model waiting for its export
            readyz, v2, grpc_ready = await three_answers(client, port)
            assert readyz == v2 and readyz[0] == 503, (readyz, v2)
            assert GRPC_NOT_LISTENING in readyz[1]["reason"] and soon in readyz[1]["reason"]
            assert readyz[1]["models"]["lenet5"]["state"] == "ready" and readyz[1]["models"]["soon"]["state"] != "ready"
            assert grpc_ready == "UNAVAILABLE"  # nothing listens: not ready either
            # 2. gRPC listening, the model still waiting
            server = await start_grpc_server(plane, "127.0.0.1", port, 1 << 20)
            plane.grpc_listening = True
            try:
                readyz, v2, grpc_ready = await three_answers(client, port)
                assert readyz == v2 and readyz[0] == 503 and grpc_ready is False, (readyz, grpc_ready)
                assert GRPC_NOT_LISTENING not in readyz[1]["reason"] and "waiting" in readyz[1]["reason"]
                # 3. exported: the worker joins it and every answer says ready
                await asyncio.to_thread(store_copy, tiny_store["lenet5"], soon)
                deadline = time.monotonic() + 60
                while (await client.get("/readyz")).status_code != 200:
                    assert time.monotonic() < deadline, (await client.get("/readyz")).text
                    await asyncio.sleep(0.2)
                readyz, v2, grpc_ready = await three_answers(client, port)
                assert readyz == v2 and readyz[0] == 200 and grpc_ready is True, (readyz, grpc_ready)
                assert readyz[1]["ready"] is True and "reason" not in readyz[1]
            finally:
                await server.stop(0)

    try:
        asyncio.run(steps())
    finally:
        repository.close()


@pytest.fixture(scope="module")
def limited_server(own_server):
    env = {"NNSERVE_WORKERS": "1", "NNSERVE_MAX_CONCURRENT_REQUESTS": "4", "NNSERVE_QUEUE_TIMEOUT_MS": "60000"}
    with own_server("admission", env) as live:
        yield live


def test_grpc_past_the_admission_limit_answers_unavailable_with_the_reason_never_cancelled(limited_server):
    import tritonclient.grpc.aio as grpcclient
    from tritonclient.utils import InferenceServerException

    async def flood(n: int) -> collections.Counter:
        client = grpcclient.InferenceServerClient(limited_server.grpc_url)  # one channel, as the run
        x = np.zeros((1, 1, 32, 32), np.float32)

        async def one() -> tuple[str, str]:
            tensor = grpcclient.InferInput("input", list(x.shape), "FP32")
            tensor.set_data_from_numpy(x)
            try:
                await client.infer("lenet5", [tensor])
                return "OK", ""
            except InferenceServerException as e:
                return str(e.status()), e.message() or ""

        try:
            return collections.Counter(await asyncio.gather(*(one() for _ in range(n))))
        finally:
            await client.close()

    answers = asyncio.run(flood(3000))
    codes = collections.Counter(code for code, _ in answers.elements())
    assert "StatusCode.CANCELLED" not in codes, (answers.most_common(5), limited_server.log())
    assert set(codes) <= {"OK", "StatusCode.UNAVAILABLE"}, answers.most_common(5)
    assert codes["OK"] > 0 and codes["StatusCode.UNAVAILABLE"] > 0, codes
    refusals = {message for code, message in answers if code == "StatusCode.UNAVAILABLE"}
    assert all("NNSERVE_MAX_CONCURRENT_REQUESTS" in m or "NNSERVE_MAX_QUEUE_SIZE" in m for m in refusals), refusals


def test_rest_and_v2_share_the_admission_count_and_name_the_limit(limited_server):
    """The same limit refuses REST and /v2 REST past it, with the reason and Retry-After."""
    import concurrent.futures

    import requests

    url = limited_server.http_url
    x = np.zeros((1, 1, 32, 32), np.float32)
    body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 1, 32, 32], "data": x.ravel().tolist()}]}

    def call(i: int) -> requests.Response:
        return requests.post(f"{url}/v2/models/lenet5/infer", json=body, timeout=60)

    with concurrent.futures.ThreadPoolExecutor(max_workers=64) as pool:
        answers = list(pool.map(call, range(400)))
    statuses = collections.Counter(r.status_code for r in answers)
    assert set(statuses) <= {200, 503}, statuses
    for r in answers:
        if r.status_code == 503:
            assert "NNSERVE_MAX_CONCURRENT_REQUESTS" in r.json()["error"] and int(r.headers["retry-after"]) >= 1
