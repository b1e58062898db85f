"""The management API's lock and the optional inference token (service/auth.py): the token files, the check,
and real servers over HTTP and gRPC.

"Passes the lock" means any answer but 401/403 (UNAUTHENTICATED/PERMISSION_DENIED): the repository routes
behind it are not what this file tests."""

from __future__ import annotations

import multiprocessing
import os
import stat
import time
from pathlib import Path

import grpc
import pytest
import requests
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc
from tritonclient.utils import InferenceServerException

from service import auth
from service.auth import INFERENCE, MANAGEMENT, OPEN, Lock, TokenFileError, load_token

MANAGEMENT_TOKEN = b"m" * 20
INFERENCE_TOKEN = b"i" * 20
WRONG = "wrong-token-4f0c8a9d1e2b3c"  # distinctive: searched for in bodies and logs


def bearer(token: bytes | str) -> list[bytes]:
    return [b"Bearer " + (token if isinstance(token, bytes) else token.encode())]


# -- which endpoints need what -------------------------------------------------------------------------------


@pytest.mark.parametrize(("path", "scope"), [
    ("/livez", OPEN), ("/readyz", OPEN), ("/metrics", OPEN), ("/v2/health/live", OPEN), ("/v2/health/ready", OPEN),
    ("/v2/models/lenet5/ready", OPEN), ("/v2/models/lenet5/versions/3/ready", OPEN),
    ("/playground", OPEN), ("/playground/", OPEN), ("/playground/gallery/3.png", OPEN), ("/playgroundx", INFERENCE),
    ("/v2/repository/index", MANAGEMENT), ("/v2/repository/models/lenet5/load", MANAGEMENT),
    ("/v2/repository/models/lenet5/unload", MANAGEMENT), ("/v2/repository/models/lenet5/traffic", MANAGEMENT),
    ("/v2/repository", MANAGEMENT), ("/v2/repository/", MANAGEMENT),
    ("/classify", INFERENCE), ("/generate", INFERENCE), ("/models", INFERENCE), ("/v2", INFERENCE),
    ("/v2/models/lenet5", INFERENCE), ("/v2/models/lenet5/infer", INFERENCE), ("/docs.json", INFERENCE),
    ("/", INFERENCE), ("/v2/models/lenet5/ready/x", INFERENCE), ("/v2/repositoryx", INFERENCE),
])
def test_rest_scope(path, scope):
    assert auth.rest_scope(path) == scope


@pytest.mark.parametrize(("method", "scope"), [
    ("ServerLive", OPEN), ("ServerReady", OPEN), ("ModelReady", OPEN),
    ("RepositoryIndex", MANAGEMENT), ("RepositoryModelLoad", MANAGEMENT), ("RepositoryModelUnload", MANAGEMENT),
    ("ModelInfer", INFERENCE), ("ModelStreamInfer", INFERENCE), ("ModelMetadata", INFERENCE),
    ("ServerMetadata", INFERENCE), ("ModelConfig", INFERENCE), ("LogSettings", INFERENCE),
])
def test_grpc_scope(method, scope):
    assert auth.grpc_scope(f"/inference.GRPCInferenceService/{method}") == scope
    assert auth.grpc_scope(f"/other.Service/{method}") == INFERENCE  # only Triton's service has open RPCs


# -- the check ---------------------------------------------------------------------------------------------


def test_without_a_management_token_the_api_is_off_whatever_is_sent():
    lock = Lock()
    for sent in ([], bearer(MANAGEMENT_TOKEN), bearer(WRONG)):
        denied = lock.check(MANAGEMENT, sent)
        assert denied.status == 403 and denied.grpc_code == grpc.StatusCode.PERMISSION_DENIED
        assert "NNSERVE_MANAGEMENT_TOKEN_FILE" in denied.message and "make serve" in denied.message
    assert lock.check(INFERENCE, []) is None and lock.check(OPEN, []) is None


def test_management_token_missing_malformed_wrong_right():
    lock = Lock(management=MANAGEMENT_TOKEN)
    assert lock.check(MANAGEMENT, []).status == 401
    assert lock.check(MANAGEMENT, []).grpc_code == grpc.StatusCode.UNAUTHENTICATED
    for malformed in ([b"Basic " + MANAGEMENT_TOKEN], [b"Bearer"], [b"Bearer   "], [MANAGEMENT_TOKEN],
                      bearer(MANAGEMENT_TOKEN) * 2):
        denied = lock.check(MANAGEMENT, malformed)
        assert denied.status == 401, malformed
        assert MANAGEMENT_TOKEN.decode() not in denied.message
    for wrong in (bearer(WRONG), bearer(MANAGEMENT_TOKEN[:-1]), bearer(MANAGEMENT_TOKEN + b"x"), bearer(b"\xff\x00")):
        denied = lock.check(MANAGEMENT, wrong)
        assert denied.status == 403 and denied.grpc_code == grpc.StatusCode.PERMISSION_DENIED, wrong
        assert WRONG not in denied.message
    assert lock.check(MANAGEMENT, bearer(MANAGEMENT_TOKEN)) is None
    assert lock.check(MANAGEMENT, [b"bearer  " + MANAGEMENT_TOKEN + b" "]) is None  # the scheme has no case
    assert lock.check(INFERENCE, []) is None  # no inference token: inference is open
    assert lock.check(OPEN, bearer(WRONG)) is None


def test_inference_token_and_the_management_token_as_its_superset():
    lock = Lock(management=MANAGEMENT_TOKEN, inference=INFERENCE_TOKEN)
    assert lock.check(INFERENCE, []).status == 401
    assert lock.check(INFERENCE, bearer(WRONG)).status == 403
    assert lock.check(INFERENCE, bearer(INFERENCE_TOKEN)) is None
    assert lock.check(INFERENCE, bearer(MANAGEMENT_TOKEN)) is None  # an admin may infer
    assert lock.check(MANAGEMENT, bearer(INFERENCE_TOKEN)).status == 403  # but not the other way round
    assert lock.check(OPEN, []) is None
    only_inference = Lock(inference=INFERENCE_TOKEN)
    assert only_inference.check(INFERENCE, bearer(INFERENCE_TOKEN)) is None
    assert "NNSERVE_MANAGEMENT_TOKEN_FILE" in only_inference.check(MANAGEMENT, bearer(INFERENCE_TOKEN)).message


def test_check_rest_and_check_grpc_read_the_authorization_header_and_metadata():
    lock = Lock(management=MANAGEMENT_TOKEN)
    headers = [(b"host", b"x"), (b"authorization", b"Bearer " + MANAGEMENT_TOKEN)]
    assert lock.check_rest("/v2/repository/index", headers) is None
    assert lock.check_rest("/v2/repository/index", headers[:1]).status == 401
    method = "/inference.GRPCInferenceService/RepositoryIndex"
    assert lock.check_grpc(method, (("authorization", "Bearer " + MANAGEMENT_TOKEN.decode()),)) is None
    assert lock.check_grpc(method, (("x-other", "Bearer " + MANAGEMENT_TOKEN.decode()),)).status == 401
    assert lock.check_grpc(method, None).status == 401


# -- token files ---------------------------------------------------------------------------------------------


def test_a_missing_token_file_is_generated_owner_only(tmp_path):
    path = tmp_path / "new-folder" / "token"
    token = load_token(str(path), "NNSERVE_MANAGEMENT_TOKEN_FILE")
    assert len(token) >= 40 and auth.TOKEN_RE.fullmatch(token)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert path.read_text().strip().encode() == token
    assert load_token(str(path), "X") == token  # read, not generated again, at the next start
    assert [p.name for p in path.parent.iterdir()] == ["token"]  # no temporary file left behind


def _load_in_process(path: str, start: float, out) -> None:
    time.sleep(max(0.0, start - time.time()))
    out.put(load_token(path, "NNSERVE_MANAGEMENT_TOKEN_FILE"))


def test_workers_starting_at_once_agree_on_one_generated_token(tmp_path):
    path = str(tmp_path / "token")
    context = multiprocessing.get_context("spawn")
    out = context.Queue()
    start = time.time() + 2.0  # every process past its imports, then all at once
    processes = [context.Process(target=_load_in_process, args=(path, start, out)) for _ in range(8)]
    for p in processes:
        p.start()
    tokens = {out.get(timeout=60) for _ in processes}
    for p in processes:
        p.join(timeout=30)
    assert len(tokens) == 1 and tokens == {Path(path).read_text().strip().encode()}
    assert [p.name for p in tmp_path.iterdir()] == ["token"]


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o644, 0o400 | 0o040])
def test_a_token_file_others_may_read_stops_the_server(tmp_path, mode):
    path = tmp_path / "token"
    path.write_text("s" * 40)
    path.chmod(mode)
    with pytest.raises(TokenFileError, match=r"too open.*chmod 600") as e:
        load_token(str(path), "NNSERVE_MANAGEMENT_TOKEN_FILE")
    assert "NNSERVE_MANAGEMENT_TOKEN_FILE" in str(e.value) and "s" * 40 not in str(e.value)


@pytest.mark.parametrize(("content", "message"), [
    ("", "is empty"), ("\n  \n", "is empty"), ("short", "at least 16"), ("two words of a token here", "no spaces"),
    ("caf\u00e9" * 8, "visible ASCII"),
])
def test_an_unusable_token_file_stops_the_server(tmp_path, content, message):
    path = tmp_path / "token"
    path.write_text(content, encoding="utf-8")
    path.chmod(0o600)
    with pytest.raises(TokenFileError, match=message):
        load_token(str(path), "NNSERVE_INFERENCE_TOKEN_FILE")


def test_a_token_file_that_cannot_be_created_is_named(tmp_path):
    folder = tmp_path / "read-only"
    folder.mkdir(mode=0o500)
    if os.geteuid() == 0:  # root writes anywhere: a folder in the way (a file where the folder should be)
        folder = tmp_path / "a-file"
        folder.write_text("")
    with pytest.raises(TokenFileError, match="cannot be created"):
        load_token(str(folder / "token"), "NNSERVE_MANAGEMENT_TOKEN_FILE")


# -- real servers ----------------------------------------------------------------------------------------------

def lenet5_only(tmp: Path, tiny_store: dict[str, str]) -> dict[str, str]:
    """Serve only lenet5: a server that loads one model starts sooner."""
    config = tmp / "models.yaml"
    config.write_text(f"models:\n  lenet5: {{tag: \"{tiny_store['lenet5']}\"}}\n")
    return {"NNSERVE_MODELS_CONFIG": str(config), "NNSERVE_QUEUE_TIMEOUT_MS": "60000"}


@pytest.fixture(scope="module")
def locked(own_server, tiny_store, tmp_path_factory):
    """A server with both tokens and 2 workers: the management token file does not exist before it starts
    (generated), the inference one is written beforehand. Yields (server, management token, inference token,
    management token path)."""
    tmp = tmp_path_factory.mktemp("auth")
    management = tmp / "secrets" / "management-token"
    inference = tmp / "inference-token"
    inference.write_text(INFERENCE_TOKEN.decode() + "\n")
    inference.chmod(0o600)
    env = {**lenet5_only(tmp, tiny_store), "NNSERVE_WORKERS": "2", "NNSERVE_MANAGEMENT_TOKEN_FILE": str(management),
           "NNSERVE_INFERENCE_TOKEN_FILE": str(inference)}
    with own_server("auth-locked", env) as server:
        yield server, management.read_text().strip(), INFERENCE_TOKEN.decode(), management


def auth_header(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.mark.integration
def test_the_generated_management_token_is_owner_only_and_only_its_path_is_logged(locked):
    server, token, _, path = locked
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and len(token) >= 40
    log = server.log(10**7)
    assert str(path) in log and token not in log
    assert log.count("generated a token") == 1, log[-5000:]  # one process made it; every other one read it


@pytest.mark.integration
@pytest.mark.parametrize(("method", "path"), [
    # "ghost": with the right token a call passes the lock and changes nothing (404: no such model)
    ("POST", "/v2/repository/index"), ("POST", "/v2/repository/models/ghost/load"),
    ("POST", "/v2/repository/models/ghost/unload"), ("POST", "/v2/repository/models/ghost/traffic"),
    ("GET", "/v2/repository/index"),
])
def test_rest_management_needs_the_management_token(locked, method, path):
    server, token, inference_token, _ = locked
    url = server.http_url + path
    missing = requests.request(method, url, timeout=30)
    assert missing.status_code == 401 and missing.headers["WWW-Authenticate"].startswith("Bearer")
    assert "Authorization: Bearer" in missing.json()["error"]
    for wrong in (WRONG, inference_token):
        answer = requests.request(method, url, headers=auth_header(wrong), timeout=30)
        assert answer.status_code == 403, answer.text
        assert wrong not in answer.text and wrong not in str(answer.headers)
    # Several requests on fresh connections: they spread over both workers, and each must accept the token.
    for _ in range(12):
        with requests.Session() as session:
            answer = session.request(method, url, headers=auth_header(token), timeout=30)
        assert answer.status_code not in (401, 403), answer.text


@pytest.mark.integration
def test_rest_inference_needs_a_token_when_one_is_set(locked):
    server, token, inference_token, _ = locked
    from loadtest.faults import digit_png

    for path in ("/v2/models/lenet5", "/models", "/v2", "/docs.json"):
        assert requests.get(server.http_url + path, timeout=30).status_code == 401, path
        assert requests.get(server.http_url + path, headers=auth_header(WRONG), timeout=30).status_code == 403
        for good in (inference_token, token):
            answer = requests.get(server.http_url + path, headers=auth_header(good), timeout=30)
            assert answer.status_code == 200, (path, answer.text[:300])
    files = {"image": ("digit.png", digit_png(), "image/png")}
    assert requests.post(server.http_url + "/classify", files=files, timeout=30).status_code == 401
    answer = requests.post(server.http_url + "/classify", files=files, headers=auth_header(inference_token),
                           timeout=60)
    assert answer.status_code == 200 and answer.json()["model"].startswith("lenet5:"), answer.text


@pytest.mark.integration
def test_health_readiness_and_metrics_stay_open(locked):
    server = locked[0]
    for path in ("/livez", "/readyz", "/v2/health/live", "/v2/health/ready", "/v2/models/lenet5/ready",
                 "/metrics"):
        assert requests.get(server.http_url + path, timeout=30).status_code == 200, path
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("lenet5")


@pytest.mark.integration
def test_tritonclient_http_sends_the_token(locked):
    server, token, _, _ = locked
    with httpclient.InferenceServerClient(server.http_url.removeprefix("http://")) as client:
        with pytest.raises(InferenceServerException) as e:
            client.load_model("lenet5")
        assert e.value.status() == "401"
        try:
            client.load_model("lenet5", headers=auth_header(token))
        except InferenceServerException as passed:  # whatever the route answers, it is not the lock
            assert passed.status() not in ("401", "403"), passed
        assert client.get_model_metadata("lenet5", headers=auth_header(token))["name"] == "lenet5"


@pytest.mark.integration
def test_grpc_management_and_inference_need_their_tokens(locked):
    server, token, inference_token, _ = locked
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        for call in (lambda h: client.get_model_repository_index(headers=h),
                     lambda h: client.load_model("ghost", headers=h),  # passes the lock, then 404
                     lambda h: client.unload_model("ghost", headers=h)):
            with pytest.raises(InferenceServerException) as e:
                call(None)
            assert e.value.status() == "StatusCode.UNAUTHENTICATED", e.value
            for wrong in (WRONG, inference_token):
                with pytest.raises(InferenceServerException) as e:
                    call({"authorization": f"Bearer {wrong}"})
                assert e.value.status() == "StatusCode.PERMISSION_DENIED" and wrong not in e.value.message()
            for _ in range(6):  # several calls; gRPC connections spread over the workers (SO_REUSEPORT)
                try:
                    call({"authorization": f"Bearer {token}"})
                except InferenceServerException as passed:
                    assert passed.status() not in ("StatusCode.UNAUTHENTICATED", "StatusCode.PERMISSION_DENIED")
        with pytest.raises(InferenceServerException) as e:
            client.get_model_metadata("lenet5")
        assert e.value.status() == "StatusCode.UNAUTHENTICATED"
        for good in (inference_token, token):
            assert client.get_model_metadata("lenet5", headers={"authorization": f"Bearer {good}"}).name == "lenet5"
    for _ in range(6):  # fresh channels: both workers' gRPC servers
        with grpcclient.InferenceServerClient(server.grpc_url) as client:
            assert client.get_server_metadata(headers={"authorization": f"Bearer {token}"}).name


@pytest.mark.integration
def test_grpc_stream_needs_the_inference_token(locked):
    server, _, inference_token, _ = locked
    request = pb.ModelInferRequest(model_name="lenet5", id="s1")
    with grpc.insecure_channel(server.grpc_url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as e:
            next(stub.ModelStreamInfer(iter([request]), timeout=30))
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        call = stub.ModelStreamInfer(iter([request]), timeout=30,
                                     metadata=(("authorization", f"Bearer {inference_token}"),))
        first = next(call)  # passes the lock: the stream answers (this request has no inputs: an error in it)
        assert "no inputs" in first.error_message, first


@pytest.mark.integration
def test_no_wrong_token_reaches_the_log(locked):
    server = locked[0]
    requests.post(server.http_url + "/v2/repository/index", headers=auth_header(WRONG), timeout=30)
    requests.get(server.http_url + "/v2/models/lenet5", headers=auth_header(WRONG), timeout=30)
    with grpcclient.InferenceServerClient(server.grpc_url) as client, pytest.raises(InferenceServerException):
        client.get_model_repository_index(headers={"authorization": f"Bearer {WRONG}"})
    time.sleep(0.5)
    assert WRONG not in server.log(10**7)


@pytest.mark.integration
def test_without_a_token_file_management_is_off_and_says_how_to_turn_it_on(live_server):
    answer = requests.post(live_server.http_url + "/v2/repository/index",
                           headers=auth_header(MANAGEMENT_TOKEN.decode()), timeout=30)
    assert answer.status_code == 403 and "NNSERVE_MANAGEMENT_TOKEN_FILE" in answer.json()["error"]
    assert requests.post(live_server.http_url + "/v2/repository/models/lenet5/load", timeout=30).status_code == 403
    with grpcclient.InferenceServerClient(live_server.grpc_url) as client:
        with pytest.raises(InferenceServerException) as e:
            client.get_model_repository_index()
        assert e.value.status() == "StatusCode.PERMISSION_DENIED"
        assert "NNSERVE_MANAGEMENT_TOKEN_FILE" in e.value.message()
        assert client.get_model_metadata("lenet5").name == "lenet5"  # no inference token: inference is open


@pytest.mark.integration
def test_a_group_readable_token_file_stops_the_server(own_server, tiny_store, tmp_path):
    token = tmp_path / "token"
    token.write_text("g" * 40)
    token.chmod(0o640)
    env = {**lenet5_only(tmp_path, tiny_store), "NNSERVE_MANAGEMENT_TOKEN_FILE": str(token)}
    with pytest.raises(RuntimeError, match="exited") as e, own_server("auth-group-readable", env):
        pass
    assert "too open" in str(e.value) and "chmod 600" in str(e.value) and "g" * 40 not in str(e.value)
