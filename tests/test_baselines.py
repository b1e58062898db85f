"""The bench's baseline servers (loadtest/baselines) and its wrk script, against the tiny test models.

Each baseline must serve the same model with the same preprocessing as nnserve, or the bench compares
nothing: its answer for a real digit must be the in-process ONNX Runtime answer. The wrk check sends
post.lua's multipart body for a second: a malformed body would be answered 4xx and counted.
Seconds per server; nothing is timed.
"""

from __future__ import annotations

import json
import os
import shutil
import urllib.request

import numpy as np
import pytest

# The baselines' frameworks are the `bench` extra (`make bench` installs it; `make setup` does not).
pytest.importorskip("litserve", reason="the bench extra is not installed: pip install -e '.[bench]'")
pytest.importorskip("fastapi", reason="the bench extra is not installed: pip install -e '.[bench]'")

from harness.data import held_out_digits, png_bytes  # noqa: E402
from loadtest.baselines.common import StoreModel  # noqa: E402
from loadtest.baselines.launch import BASELINES, running_baseline  # noqa: E402
from loadtest.bench.stacks import top_label  # noqa: E402
from loadtest.bench.wrk import multipart_body, run_wrk  # noqa: E402

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def baseline_env(tiny_store) -> dict[str, str]:
    return {"BENTOML_HOME": os.environ["BENTOML_HOME"], "BASELINE_LENET5_TAG": tiny_store["lenet5"],
            "BASELINE_VGG_FC7_TAG": tiny_store["vgg_fc7"], "BASELINE_ORT_THREADS": "1"}


def post_digit(url: str, png: bytes, fields: dict[str, str] | None = None) -> tuple[int, bytes]:
    body, content_type = multipart_body(png, fields)
    request = urllib.request.Request(url, data=body, headers={"Content-Type": content_type})
    with urllib.request.urlopen(request, timeout=60) as response:
        return response.status, response.read()


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_baseline_answers_like_onnx_runtime_in_process(name, baseline_env, monkeypatch, tmp_path):
    monkeypatch.setenv("BASELINE_LENET5_TAG", baseline_env["BASELINE_LENET5_TAG"])
    model = StoreModel.load("lenet5", threads=1)
    digits, _ = held_out_digits()
    pngs = [png_bytes(d) for d in digits[:3]]
    expected = [model.top_k(model.run(model.decode(p)[None], output="logits")[0]) for p in pngs]
    with running_baseline(name, tmp_path / f"{name}.log", baseline_env) as server:
        for png, want in zip(pngs, expected, strict=True):
            status, body = post_digit(server.http_url + "/classify", png)
            assert status == 200, server.log(3000)
            answer = json.loads(body)
            assert top_label(answer) == want["predictions"][0]["label"], (answer, want)
            predictions = (answer[0] if isinstance(answer, list) else answer)["predictions"]
            assert len(predictions) == 5
            assert np.isclose(predictions[0]["probability"], want["predictions"][0]["probability"], rtol=1e-4)
        if "/features" in BASELINES[name][1]:
            status, body = post_digit(server.http_url + "/features", pngs[0], {"format": "json"})
            assert status == 200 and json.loads(body)["dim"] == len(json.loads(body)["features"]) > 0


@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk not installed (apt-get install -y wrk)")
def test_wrk_script_sends_requests_the_server_accepts(baseline_env, tmp_path):
    digits, _ = held_out_digits()
    png = tmp_path / "digit.png"
    png.write_bytes(png_bytes(digits[0]))
    with running_baseline("fastapi", tmp_path / "fastapi.log", baseline_env) as server:
        result = run_wrk(server.http_url + "/classify", ["multipart", str(png), "top_k=2"], connections=2, seconds=1)
        assert result.requests > 0
        assert result.errors == 0, server.log(3000)
        bad = run_wrk(server.http_url + "/classify", ["multipart", str(png), "top_k=zero"], connections=1, seconds=1)
        assert bad.requests > 0 and bad.status_errors == bad.requests  # a 422 for every request: counted
