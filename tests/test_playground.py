"""The playground's files and its safety rules over real HTTP (service/playground.py); what the page does in a
browser is tests/test_playground_browser.py."""

from __future__ import annotations

import asyncio
import io
import re

import httpx
import numpy as np
import pytest
import requests
from PIL import Image
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse

from service import playground
from service.front import FrontDoor
from service.playground import CSP, GALLERY_PER_LABEL, STATIC
from service.settings import Settings

SCRIPT = (STATIC / "playground.js").read_text()


def test_every_playground_answer_carries_the_csp(live_server):
    for path in ("/playground", "/playground/", "/playground/playground.js", "/playground/playground.css",
                 "/playground/config.json", "/playground/gallery.json", "/playground/gallery/0.png",
                 "/playground/nothing.js", "/playground/gallery/9999.png"):
        response = requests.get(live_server.http_url + path, allow_redirects=False, timeout=30)
        assert response.headers.get("content-security-policy") == CSP, path
        assert response.headers.get("x-content-type-options") == "nosniff", path
    assert "script-src 'self'" in CSP and "'unsafe-inline'" not in CSP and "connect-src 'self'" in CSP


def test_page_and_assets(live_server):
    page = requests.get(live_server.http_url + "/playground", timeout=30)  # redirected to /playground/
    assert page.status_code == 200 and page.url.endswith("/playground/")
    assert page.headers["content-type"].startswith("text/html")
    html = page.text
    assert '<script src="playground.js" defer></script>' in html
    # No inline script, no inline style attribute or element: the CSP would block them anyway.
    assert not re.search(r"<script(?![^>]*\bsrc=)", html) and "<style" not in html and " style=" not in html
    assert not re.search(r"\bon[a-z]+=", html)  # no inline event handlers
    for name, kind in (("playground.js", "text/javascript"), ("playground.css", "text/css")):
        response = requests.get(f"{live_server.http_url}/playground/{name}", timeout=30)
        assert response.status_code == 200 and response.headers["content-type"].startswith(kind)
    missing = requests.get(live_server.http_url + "/playground/secret.txt", timeout=30)
    assert missing.status_code == 404 and "secret.txt" in missing.json()["error"]


def test_page_works_offline():
    """Nothing is loaded from another origin: no URL with a scheme or a protocol-relative one in the files."""
    for name in playground.FILES:
        text = (STATIC / name).read_text()
        assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", text, re.I), name
        assert "@import" not in text and "@font-face" not in text, name


def test_script_inserts_text_never_html():
    """Model output and server strings go in as text: the script uses none of the HTML-parsing DOM APIs."""
    for api in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function",
                "createContextualFragment", "DOMParser", "srcdoc"):
        assert api not in SCRIPT, api
    # ...and the page calls the public inference API only, never the management one.
    assert "/v2/repository" not in SCRIPT and "management" not in SCRIPT.lower()
    called = set(re.findall(r'api\("(/[^"]*)"', SCRIPT)) | set(re.findall(r"api\(`(/[^`$]*)", SCRIPT))
    assert called == {"/models", "/classify", "/features", "/generate", "/metrics", "/playground/config.json",
                      "/playground/gallery.json"}, called


def test_config_states_the_api_limits(live_server):
    config = requests.get(live_server.http_url + "/playground/config.json", timeout=30).json()
    assert config["max_upload_bytes"] == Settings().max_upload_bytes
    assert config["max_stream_chars"] == 10_000 and config["inference_token"] is False


def test_gallery_is_uci_digits_as_pngs(live_server):
    digits = requests.get(live_server.http_url + "/playground/gallery.json", timeout=30).json()["digits"]
    assert len(digits) == 10 * GALLERY_PER_LABEL
    assert sorted({d["label"] for d in digits}) == [str(i) for i in range(10)]
    png = requests.get(live_server.http_url + digits[-1]["url"], timeout=30)
    assert png.headers["content-type"] == "image/png"
    image = Image.open(io.BytesIO(png.content))
    assert image.size == (28, 28) and image.mode == "L"
    # The gallery is what /classify takes: a served image model answers for it.
    answer = requests.post(live_server.http_url + "/classify", files={"image": png.content}, timeout=30)
    assert answer.status_code == 200, answer.text


def test_gallery_sheet_is_the_uci_digits():
    """The sheet in git (the serving runtime has no scikit-learn) holds exactly the digits it is made from."""
    images, labels = playground.gallery_digits()
    entries, pngs = playground.gallery()
    assert [e["label"] for e in entries] == [str(label) for label in labels]
    served = np.stack([np.asarray(Image.open(io.BytesIO(png))) for png in pngs])
    assert np.array_equal(served, images)


def test_playground_open_under_an_inference_token(own_server, tmp_path):
    token_file = tmp_path / "inference-token"
    token_file.write_text("playground-inference-token-0123456789\n")
    token_file.chmod(0o600)
    management_file = tmp_path / "management-token"
    management_file.write_text("playground-management-token-9876543210\n")
    management_file.chmod(0o600)
    with own_server("playground-token", {"NNSERVE_INFERENCE_TOKEN_FILE": str(token_file),
                                         "NNSERVE_MANAGEMENT_TOKEN_FILE": str(management_file)}) as live:
        # The files are open (they hold no data); the API behind them is not.
        bodies = []
        for path in ("/playground/", "/playground/playground.js", "/playground/playground.css",
                     "/playground/config.json", "/playground/gallery.json"):
            response = requests.get(live.http_url + path, timeout=30)
            assert response.status_code == 200, path
            bodies.append(response.text)
        assert requests.get(live.http_url + "/models", timeout=30).status_code == 401
        assert requests.get(live.http_url + "/playground/config.json", timeout=30).json()["inference_token"] is True
        # Neither token reaches the page.
        for body in bodies:
            assert "playground-management-token" not in body and "playground-inference-token" not in body


def test_playground_off_leaves_the_path_to_bentoml():
    """NNSERVE_PLAYGROUND=off: the front door has no playground app and the path falls through to BentoML
    (404 there). A plain Starlette app stands in for BentoML's here."""
    assert Settings.from_env({"NNSERVE_PLAYGROUND": "off"}).playground is False
    assert Settings.from_env({}).playground is True
    bentoml_stand_in = Starlette()
    bentoml_stand_in.add_route("/{path:path}", lambda request: PlainTextResponse("bentoml", 404))
    for app, status, body in ((None, 404, "bentoml"), (playground.create_app(Settings()), 200, "nnserve playground")):
        door = FrontDoor(bentoml_stand_in, None, None, lambda: None, playground_app=app)
        response = asyncio.run(get(door, "/playground/"))
        assert response.status_code == status and body in response.text


async def get(app, path: str) -> httpx.Response:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        return await client.get(path)


@pytest.mark.parametrize("value", ["on", "off", "true", "0"])
def test_playground_setting_parses(value):
    assert Settings.from_env({"NNSERVE_PLAYGROUND": value}).playground is (value in ("on", "true"))
