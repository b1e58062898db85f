"""The limit: nnserve's HTTP stack with nothing behind it. ``bentoml serve`` with nnserve's worker count and
access-log setting, uvicorn + uvloop + httptools, and a raw ASGI route in front of BentoML's app as
nnserve's front door (service/front.py) has: it reads the whole request body, then answers a fixed JSON
the size of a /classify answer. No parsing, no decoding, no model, no metrics.

    bentoml serve loadtest.baselines.limit:Limit --port 8000

nnserve's throughput over this row's is the share of the bare stack's capacity that nnserve's own work
leaves; the bench prints that ratio beside the CPU breakdown of a request (loadtest/bench/profile.py).
"""

from __future__ import annotations

import json

import bentoml

from service.settings import Settings

SETTINGS = Settings.from_env()
ANSWER = json.dumps({"model": "lenet5:fixed", "batch_size": 1, "timings_ms": {},
                     "predictions": [{"label": str(i), "probability": 0.1} for i in range(5)]}).encode()
HEADERS = [(b"content-type", b"application/json"), (b"content-length", str(len(ANSWER)).encode())]


@bentoml.service(workers=SETTINGS.workers, logging={"access": {"enabled": SETTINGS.access_log}})
class Limit:
    @bentoml.api
    def ping(self) -> str:  # BentoML wants one API; the bench never calls it
        return "ok"


async def fixed_answer(scope: dict, receive, send) -> None:
    more = True
    while more:  # the same body as nnserve's requests, read to the end
        message = await receive()
        more = message.get("more_body", False)
    await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
    await send({"type": "http.response.body", "body": ANSWER})


class FrontDoor:
    def __init__(self, bentoml_app) -> None:
        self.bentoml_app = bentoml_app

    async def __call__(self, scope: dict, receive, send) -> None:
        if scope["type"] == "http" and scope["path"] in ("/classify", "/readyz", "/livez"):
            return await fixed_answer(scope, receive, send)
        return await self.bentoml_app(scope, receive, send)


_bentoml_to_asgi = bentoml.Service.to_asgi  # type(Limit): the decorator made Limit a Service


def _to_asgi(service, is_main: bool = True):
    app = _bentoml_to_asgi(service, is_main)
    return FrontDoor(app) if service is Limit else app


bentoml.Service.to_asgi = _to_asgi
