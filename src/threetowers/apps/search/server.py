"""``threetowers serve``: an index searched over HTTP, and the page that searches it.

Every request is treated as hostile. Inputs are bounded (:class:`Limits`); an uploaded image
is refused from its header when it has too many pixels, before it is decoded; ids are looked
up in the index's id table, so nothing in a request names a file; a request's body is refused
from its Content-Length before it is read. Every error is JSON ``{"error": message}`` with a
4xx status, and the server keeps serving after it. The page is three files of this package,
read at start-up, that fetch nothing from elsewhere (a Content-Security-Policy says so to the
browser too). Hosts other than the one served on are refused, so a web page elsewhere cannot
reach a loopback server through a name of its own (DNS rebinding). HEAD is answered wherever
GET is (its headers, no body).

Slow and numerous clients are bounded by :mod:`threetowers.apps.search.connections`.
"""

from __future__ import annotations

import io
import logging
import math
import time
import warnings
from dataclasses import dataclass
from importlib import resources
from typing import Annotated
from urllib.parse import quote

import uvicorn
from fastapi import FastAPI, File, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from PIL import Image
from starlette.exceptions import HTTPException

from threetowers.apps.embed import parse_alpha
from threetowers.apps.search.connections import quiet_accept_errors, server_config
from threetowers.apps.search.engine import TARGETS, QueryEncoder, SearchIndex
from threetowers.apps.search.index_files import IndexMismatch
from threetowers.data.sources.bad_samples import BadSample
from threetowers.data.sources.decode import load_image

log = logging.getLogger(__name__)
LOOPBACK = ("127.0.0.1", "localhost", "::1")
PAGE = {  # route -> (file of threetowers/apps/search/static, media type)
    "/": ("index.html", "text/html; charset=utf-8"),
    "/static/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/static/style.css": ("style.css", "text/css; charset=utf-8"),
}
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' blob:; "
    "object-src 'none'; base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


@dataclass(frozen=True)
class Limits:
    max_text_chars: int = 1000  # far beyond any text tower's context
    max_k: int = 1000
    max_upload_bytes: int = 10 * 2**20
    max_image_pixels: int = 40_000_000  # a 40-megapixel photo; bombs are far larger
    # 1000 characters of text, percent-encoded UTF-8, fit 12 KB; the rest is room for headers
    max_head_bytes: int = 64 * 2**10
    request_timeout: float = 10.0  # seconds for a request's head, or between two body reads
    idle_timeout: float = 5.0  # seconds a connection waits for its next request
    max_connections: int = 100  # a browser opens 6 per server; lowered to fit `ulimit -n`


class RequestError(Exception):
    """A request that cannot be answered: its status and one message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def create_app(index: SearchIndex, encoder: QueryEncoder, limits: Limits = Limits(), hosts=None):
    """The FastAPI app serving ``index`` (queries embedded by ``encoder``); ``hosts``: the
    Host names it answers to (default: loopback names; ``["*"]``: any)."""
    if encoder.fingerprint != index.fingerprint:
        raise IndexMismatch(
            f"the run {encoder.run.run_dir} (fingerprint {encoder.fingerprint}) is not the one "
            f"that built {index.layout.root} ({index.fingerprint}, {index.manifest['run']} at "
            f"step {index.manifest['step']}); it was trained further or replaced: build the "
            "index again with `threetowers index`"
        )
    app = FastAPI(
        title="threetowers search",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        redirect_slashes=False,  # "/images/." is a 404 like any unknown id, not a redirect
    )
    allowed = set(hosts or LOOPBACK)
    files = resources.files("threetowers.apps.search") / "static"
    page = {route: ((files / name).read_bytes(), kind) for route, (name, kind) in PAGE.items()}

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if "*" not in allowed and _host_name(request.headers.get("host", "")) not in allowed:
            return _error(400, f"this server answers to {', '.join(sorted(allowed))} only")
        if request.method not in ("GET", "HEAD"):
            length = request.headers.get("content-length")
            if length is None or not length.isdigit():
                return _error(411, "send the upload with a Content-Length header")
            if int(length) > limits.max_upload_bytes:
                mb = limits.max_upload_bytes / 2**20
                return _error(413, f"the upload is larger than {mb:.0f} MB")
        response = await call_next(request)
        response.headers.update(SECURITY_HEADERS)
        return response

    app.add_middleware(HeadAsGet)  # added last: outermost, so the guard and routes see a GET

    @app.exception_handler(RequestError)
    async def request_error(_, error: RequestError):
        return _error(error.status, error.message)

    @app.exception_handler(HTTPException)
    async def http_error(_, error: HTTPException):
        return _error(error.status_code, str(error.detail))

    @app.exception_handler(RequestValidationError)
    async def invalid(_, error: RequestValidationError):
        first = error.errors()[0]
        where = ".".join(str(part) for part in first.get("loc", ())[1:]) or "request"
        return _error(422, f"{where}: {first.get('msg', 'invalid')}")

    @app.exception_handler(Exception)
    async def internal(_, error: Exception):  # a bug: logged here, never sent
        log.exception("request failed", exc_info=error)
        return _error(500, "internal error (logged by the server)")

    for route, (body, kind) in page.items():
        app.add_api_route(route, _static(body, kind), methods=["GET"], include_in_schema=False)

    @app.get("/api/info")
    def info() -> dict:
        manifest = index.manifest
        return {
            "images": len(index),
            "captions": len(index.captions),
            "mode": manifest["mode"],
            "parts": manifest["parts"],
            "mixes": len(manifest["parts"]) > 1,
            "run": manifest["run"],
            "step": manifest["step"],
            "ann": manifest["ann"]["kind"],
            "limits": {"max_text_chars": limits.max_text_chars, "max_k": limits.max_k},
        }

    @app.get("/api/search")
    def search_text(
        text: Annotated[str, Query(description="the query")],
        k: int = 10,
        alpha: float = 1.0,
        weights: str | None = None,
        target: str = "images",
    ) -> dict:
        if not text.strip():
            raise RequestError(400, "text: give a non-empty query")
        if len(text) > limits.max_text_chars:
            raise RequestError(400, f"text: at most {limits.max_text_chars} characters")
        return _answer(lambda: encoder.text(text), k, alpha, weights, target)

    @app.post("/api/search")
    def search_image(
        image: Annotated[UploadFile, File(description="the query image")],
        k: int = 10,
        alpha: float = 1.0,
        weights: str | None = None,
        target: str = "images",
    ) -> dict:
        data = image.file.read(limits.max_upload_bytes + 1)
        decoded = _decode_upload(data, limits)
        return _answer(lambda: encoder.image(decoded), k, alpha, weights, target)

    def _answer(embed, k: int, alpha: float, weights: str | None, target: str) -> dict:
        if not 1 <= k <= limits.max_k:
            raise RequestError(400, f"k: give a number of results from 1 to {limits.max_k}")
        if target not in TARGETS:
            raise RequestError(400, f"target: one of {', '.join(TARGETS)}")
        if target == "captions" and not index.captions:
            raise RequestError(400, "target: this index holds no captions")
        mixture = _mixture(encoder, alpha, weights)
        start = time.perf_counter()
        hits = index.search(embed(), mixture, k, target)
        return {
            "results": [
                {
                    "id": hit.id,
                    "score": hit.score,
                    "image_url": f"/images/{quote(hit.id, safe='')}",
                    "caption": hit.caption,
                }
                for hit in hits
            ],
            "alpha": mixture.get("f", 0.0),
            "weights": mixture,
            "took_ms": (time.perf_counter() - start) * 1e3,
        }

    @app.get("/images/{image_id:path}")
    def thumbnail(image_id: str) -> Response:
        data = index.thumbnail(image_id)
        if data is None:
            raise RequestError(404, "no image with this id in the index")
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})

    return app


class HeadAsGet:
    """HEAD answered as the GET it stands for, without the body (RFC 9110 §9.3.2)."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            return await self.app(scope, receive, send)

        async def headers_only(message) -> None:
            if message["type"] == "http.response.body":
                message = {**message, "body": b""}
            await send(message)

        await self.app({**scope, "method": "GET"}, receive, headers_only)


def _static(body: bytes, kind: str):
    def serve() -> Response:
        return Response(body, media_type=kind)

    return serve


def _mixture(encoder: QueryEncoder, alpha: float, weights: str | None) -> dict[str, float]:
    if not math.isfinite(alpha) or not 0.0 <= alpha <= 1.0:
        raise RequestError(400, "alpha: give a number from 0 to 1")
    if alpha < 1.0 and not encoder.parts.mixes:
        raise RequestError(400, f"alpha: a {encoder.run.model.mode} model has no mixture; use 1")
    try:
        return encoder.weights(parse_alpha(weights) if weights is not None else alpha)
    except ValueError as error:
        raise RequestError(400, f"weights: {error}") from None


def _decode_upload(data: bytes, limits: Limits) -> Image.Image:
    if len(data) > limits.max_upload_bytes:
        raise RequestError(413, f"the upload is larger than {limits.max_upload_bytes} bytes")
    if not data:
        raise RequestError(400, "image: the upload is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as header:  # the header only: no pixels yet
                width, height = header.size
    except Image.DecompressionBombError:  # Pillow's own limit, also from the header
        raise RequestError(413, f"image: more than {limits.max_image_pixels} pixels") from None
    except Exception:  # Pillow raises many types for data that is not an image
        raise RequestError(400, "image: not an image file Pillow can read") from None
    if width * height > limits.max_image_pixels:
        raise RequestError(
            413, f"image: {width}x{height} pixels; at most {limits.max_image_pixels} allowed"
        )
    try:
        return load_image(data, "upload")
    except BadSample as error:
        raise RequestError(400, f"image: {error.detail}") from None


def _host_name(header: str) -> str:
    """The name in a Host header, without its port (``[::1]:8000`` -> ``::1``)."""
    if header.startswith("["):
        return header[1:].partition("]")[0]
    return header.partition(":")[0]


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=SECURITY_HEADERS)


def serve(index_dir: str, host: str = "127.0.0.1", port: int = 8000, run: str | None = None):
    """Serve ``index_dir`` until interrupted, with its own run (or ``run``)."""
    from threetowers.model.trained import load_trained

    index = SearchIndex(index_dir)
    encoder = QueryEncoder(load_trained(run or index.manifest["run"]))
    loopback = host in LOOPBACK
    hosts = None if loopback else ["*"] if host in ("0.0.0.0", "::") else [host]
    app = create_app(index, encoder, hosts=hosts)
    config = server_config(app, host, port, limits=Limits(), headers=SECURITY_HEADERS)
    where = f"[{host}]" if ":" in host else host
    print(f"serving {index_dir} ({len(index)} images) on http://{where}:{port}/", flush=True)
    if not loopback:
        log.warning(
            "%s is not a loopback address: anyone who can reach this machine can search the "
            "index and see its images",
            host,
        )
    quiet_accept_errors()
    uvicorn.Server(config).run()
