"""wrk as the load generator: a C event loop, so the client takes little of the CPU it shares with the
server (locust needs a core for a few hundred requests/s; wrk needs a few percent).

Every run is closed loop: ``connections`` requests in flight, each connection sending its next request as
soon as the previous answer arrives, for ``seconds``. ``loadtest/wrk/post.lua`` builds the request body
once and prints a JSON summary (requests, req/s, p50/p95/p99, errors) that :func:`run_wrk` parses.
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from loadtest.bench.common import REPO_ROOT

POST_LUA = REPO_ROOT / "loadtest" / "wrk" / "post.lua"
HEADER_LENGTH = "Inference-Header-Content-Length"  # Triton's binary tensor extension: the JSON part's size
TIMEOUT_S = 10  # wrk drops (and does not time) answers slower than its --timeout, 2 s by default


def wrk_binary() -> str:
    found = shutil.which("wrk")
    if not found:
        raise RuntimeError("wrk is not installed: `apt-get install -y wrk` (Debian/Ubuntu; `make bench` does it "
                           "as root), or put a wrk 4.x on PATH")
    return found


@dataclass
class WrkResult:
    connections: int
    requests: int
    seconds: float
    rps: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float
    status_errors: int  # answers with status >= 400
    socket_errors: int  # connect/read/write errors and timeouts

    @property
    def errors(self) -> int:
        return self.status_errors + self.socket_errors

    @property
    def ok_rps(self) -> float:
        """Goodput: 2xx answers per second. wrk's ``requests`` counts every completed response, whatever its
        status (socket errors and timeouts are not in it), and its ``status_errors`` every status >= 400;
        no server here answers 1xx or 3xx (each row's checked request must be 200), so the difference is
        the 2xx answers. An error answer is not work done."""
        return max(0, self.requests - self.status_errors) / self.seconds if self.seconds else 0.0


def run_wrk(url: str, body_args: list[str], connections: int, seconds: float) -> WrkResult:
    """One wrk run; ``body_args`` are post.lua's arguments (``multipart PNG [k=v ...]`` or
    ``body FILE CONTENT_TYPE``)."""
    # One wrk thread is plenty for a few thousand requests/s and leaves the cores to the server.
    cmd = [wrk_binary(), "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", f"--timeout={TIMEOUT_S}s",
           "-s", str(POST_LUA), url, "--", *body_args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60)
    line = next((x for x in done.stdout.splitlines() if x.startswith("WRK_JSON ")), None)
    if done.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({done.returncode}): {shlex.join(cmd)}\n{done.stdout[-2000:]}"
                           f"{done.stderr[-2000:]}")
    return WrkResult(connections=connections, **{k: v for k, v in json.loads(line.split(" ", 1)[1]).items()
                                                  if k in WrkResult.__dataclass_fields__})


@dataclass
class RequestFiles:
    """The request bodies every server gets, written once to the bench's work dir."""

    png: Path  # a held-out MNIST digit
    label: str  # its true label
    v2_json: Path | None = None  # KServe v2 JSON infer request: that digit, preprocessed, batch 1
    classify_fields: dict[str, str] = field(default_factory=dict)  # form fields after the image, e.g. model
    v2_binary: Path | None = None  # the same tensor in Triton's binary extension, as tritonclient.http sends it
    v2_binary_json_size: int = 0  # its JSON header's length (Inference-Header-Content-Length)

    def classify_args(self) -> list[str]:
        # top_k left at its default (5) on every server
        return ["multipart", str(self.png), *(f"{k}={v}" for k, v in self.classify_fields.items())]

    def features_args(self) -> list[str]:
        return ["multipart", str(self.png), "format=npy"]

    def v2_args(self) -> list[str]:
        if self.v2_json is None:
            raise ValueError("these request files have no KServe v2 body")
        return ["body", str(self.v2_json), "application/json"]

    def v2_binary_args(self) -> list[str]:
        if self.v2_binary is None:
            raise ValueError("these request files have no binary KServe v2 body")
        return ["body", str(self.v2_binary), "application/octet-stream",
                f"{HEADER_LENGTH}={self.v2_binary_json_size}"]


def v2_json_body(x: np.ndarray, input_name: str) -> bytes:
    """A KServe v2 JSON request for the float32 batch ``x``."""
    return json.dumps({"inputs": [{"name": input_name, "shape": list(x.shape), "datatype": "FP32",
                                   "data": x.ravel().tolist()}]}).encode()


def v2_binary_body(x: np.ndarray, input_name: str, output: str) -> tuple[bytes, int]:
    """(body, JSON header length) of a KServe v2 request for ``x`` in Triton's binary tensor extension, made
    by tritonclient.http itself (what Triton's clients send), asking for ``output`` as binary."""
    import tritonclient.http as http

    tensor = http.InferInput(input_name, list(x.shape), "FP32")
    tensor.set_data_from_numpy(np.ascontiguousarray(x, dtype=np.float32), binary_data=True)
    body, json_size = http.InferenceServerClient.generate_request_body(
        [tensor], outputs=[http.InferRequestedOutput(output, binary_data=True)])
    return body, int(json_size or 0)


def write_v2_binary(files: RequestFiles, x: np.ndarray, input_name: str, output: str, path: Path) -> None:
    body, files.v2_binary_json_size = v2_binary_body(x, input_name, output)
    path.write_bytes(body)
    files.v2_binary = path


def request_files(workdir: Path, preprocessing: dict, input_name: str, output: str = "logits") -> RequestFiles:
    from harness.data import held_out_digits, png_bytes
    from models.preprocess import preprocess_uint8

    digits, labels = held_out_digits()
    png = workdir / "digit.png"
    png.write_bytes(png_bytes(digits[0]))
    v2 = workdir / "v2-lenet5-1.json"
    x = preprocess_uint8(digits[:1], preprocessing)
    v2.write_bytes(v2_json_body(x, input_name))
    files = RequestFiles(png, str(labels[0]), v2)
    write_v2_binary(files, x, input_name, output, workdir / "v2-lenet5-1.bin")
    return files


def multipart_body(png: bytes, fields: dict[str, str] | None = None) -> tuple[bytes, str]:
    """The same multipart bytes post.lua sends (for the Python-side clients): (body, Content-Type)."""
    boundary = "----nnservebench0b8e1f"
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="digit.png"\r\n'
             "Content-Type: image/png\r\n\r\n".encode() + png + b"\r\n"]
    parts += [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
              for k, v in (fields or {}).items()]
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"
