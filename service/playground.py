"""``/playground``: a page that shows the three uses of nnserve in a browser (docs/playground.md).

Static files (``service/playground/``: one HTML file, one script, one style sheet; no build step, nothing from
another origin) and two small JSON documents the page needs that no inference endpoint gives:

- ``/playground/config.json``: the request limits of this server (the page checks an upload's size before
  sending it, with the same limit as the API), from Settings.
- ``/playground/gallery.json`` and ``/playground/gallery/<i>.png``: the features panel's gallery, UCI digits
  (scikit-learn ships them, so nothing is downloaded) in MNIST's layout, cut from ``gallery.png`` on first use.

Everything else the page does goes through the public inference endpoints (``GET /models``, ``/classify``,
``/features``, ``/generate``) and ``/metrics``, as any client would; it never calls the management API.

Every answer carries a Content-Security-Policy that allows scripts, styles and connections from this origin
only and no inline script: text a model writes is inserted as text by the page, and even markup that got in
could not run a script.
"""

from __future__ import annotations

import functools
import io
from pathlib import Path

import numpy as np
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from service.generation import MAX_NEW_CHARS, MAX_PROMPT_CHARS, MAX_STREAM_CHARS
from service.settings import Settings

STATIC = Path(__file__).parent / "playground"
FILES = {"index.html": "text/html; charset=utf-8", "playground.js": "text/javascript; charset=utf-8",
         "playground.css": "text/css; charset=utf-8"}
PREFIX = "/playground"
GALLERY_PER_LABEL = 12  # 120 digits: enough that 8 neighbours can all share the query's label
GALLERY_SHEET = STATIC / "gallery.png"  # written by `python -m service.playground` (write_gallery_sheet)
# 'self' only: no other origin, no inline script or style, no eval; images also from blob: (the preview of a
# picked file) and data: (the canvas).
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; connect-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
           "Cache-Control": "no-cache"}


def is_playground(path: str) -> bool:
    return path == PREFIX or path.startswith(PREFIX + "/")


@functools.cache
def static_file(name: str) -> bytes:
    return (STATIC / name).read_bytes()


def gallery_digits() -> tuple[np.ndarray, np.ndarray]:
    """The gallery from its source: the first GALLERY_PER_LABEL UCI digits of each label (scikit-learn's
    ``load_digits``, in MNIST's layout by ``models.data``): uint8 [10 * GALLERY_PER_LABEL, 28, 28] and labels."""
    from models.data import load_uci_digits  # scikit-learn: the training environment, not the serving one

    images, labels = load_uci_digits()
    chosen = [i for label in range(10) for i in np.flatnonzero(labels == label)[:GALLERY_PER_LABEL]]
    return images[chosen], labels[chosen]


def write_gallery_sheet(path: Path = GALLERY_SHEET) -> None:
    """Write the gallery as one PNG sheet (row = label, GALLERY_PER_LABEL digits per row), temp file then
    rename. Kept in git because the serving runtime (the Bento, the container) has no scikit-learn;
    tests/test_playground.py checks that it equals ``gallery_digits()``."""
    from PIL import Image

    images, _ = gallery_digits()
    tiles = images.reshape(10, GALLERY_PER_LABEL, 28, 28).transpose(0, 2, 1, 3).reshape(10 * 28, -1)
    temp = path.with_suffix(".tmp")
    Image.fromarray(tiles).save(temp, format="PNG", optimize=True)
    temp.replace(path)


@functools.cache
def gallery() -> tuple[list[dict], list[bytes]]:
    """The gallery's entries ({"index", "label", "url"}) and PNG files (28x28, white digit on black), cut from
    the sheet once, on first use."""
    from PIL import Image

    sheet = np.asarray(Image.open(GALLERY_SHEET).convert("L"))
    entries: list[dict] = []
    pngs: list[bytes] = []
    for label in range(10):
        for column in range(GALLERY_PER_LABEL):
            buffer = io.BytesIO()
            Image.fromarray(sheet[label * 28:(label + 1) * 28, column * 28:(column + 1) * 28]).save(buffer, "PNG")
            entries.append({"index": len(pngs), "label": str(label), "url": f"{PREFIX}/gallery/{len(pngs)}.png"})
            pngs.append(buffer.getvalue())
    return entries, pngs


def create_app(settings: Settings) -> Starlette:
    def respond(body: bytes, media_type: str) -> Response:
        return Response(body, media_type=media_type, headers=HEADERS)

    async def index(request: Request) -> Response:
        return RedirectResponse(f"{PREFIX}/", headers=HEADERS)  # relative asset URLs resolve under /playground/

    async def page(request: Request) -> Response:
        return respond(static_file("index.html"), FILES["index.html"])

    async def asset(request: Request) -> Response:
        name = request.path_params["name"]
        if name not in FILES:
            return JSONResponse({"error": f"no file {name[:100]!r} in the playground"}, 404, headers=HEADERS)
        return respond(static_file(name), FILES[name])

    async def config(request: Request) -> Response:
        return JSONResponse({"max_upload_bytes": settings.max_upload_bytes, "max_prompt_chars": MAX_PROMPT_CHARS,
                             "max_new_chars": MAX_NEW_CHARS, "max_stream_chars": MAX_STREAM_CHARS,
                             "inference_token": bool(settings.inference_token_file)}, headers=HEADERS)

    async def gallery_index(request: Request) -> Response:
        return JSONResponse({"source": "UCI digits (scikit-learn's load_digits) in MNIST's 28x28 layout",
                             "digits": gallery()[0]}, headers=HEADERS)

    async def gallery_png(request: Request) -> Response:
        pngs = gallery()[1]
        index = request.path_params["index"]
        if not 0 <= index < len(pngs):
            return JSONResponse({"error": f"no gallery digit {index}; there are {len(pngs)}"}, 404, headers=HEADERS)
        return Response(pngs[index], media_type="image/png",
                        headers=HEADERS | {"Cache-Control": "public, max-age=86400"})

    return Starlette(routes=[
        Route(PREFIX, index, methods=["GET", "HEAD"]),
        Route(f"{PREFIX}/", page, methods=["GET", "HEAD"]),
        Route(f"{PREFIX}/config.json", config, methods=["GET", "HEAD"]),
        Route(f"{PREFIX}/gallery.json", gallery_index, methods=["GET", "HEAD"]),
        Route(PREFIX + "/gallery/{index:int}.png", gallery_png, methods=["GET", "HEAD"]),
        Route(PREFIX + "/{name}", asset, methods=["GET", "HEAD"]),
    ])


if __name__ == "__main__":
    write_gallery_sheet()
    print("wrote", GALLERY_SHEET)
