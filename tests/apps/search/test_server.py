"""threetowers serve against a live server on a loopback port: the API's answers, and
malformed and hostile requests, each answered by one JSON error with a 4xx status."""

from __future__ import annotations

import io
import socket
import struct
import zlib
from urllib.parse import quote

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from threetowers.apps.search import connections
from threetowers.apps.search import server as server_module
from threetowers.cli import main

SLOW = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def png(width: int, height: int, colour=(200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def bomb_png(width: int, height: int) -> bytes:
    """A valid PNG header of ``width`` x ``height`` greyscale pixels whose data is tiny."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    rows = zlib.compress(b"\0" * (width + 1) * 64)  # far fewer rows than claimed
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")
    )


def assert_error(response: httpx.Response, status: int | None = None) -> str:
    assert 400 <= response.status_code < 500, (response.status_code, response.text)
    if status is not None:
        assert response.status_code == status, response.text
    body = response.json()
    assert list(body) == ["error"] and isinstance(body["error"], str) and body["error"]
    assert "Traceback" not in body["error"]
    return body["error"]


def test_text_search_answers_in_the_documented_shape(live):
    response = httpx.get(f"{live.url}/api/search", params={"text": "a red star", "k": 5})
    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"results", "alpha", "weights", "took_ms"}
    assert body["alpha"] == 1.0 and body["took_ms"] > 0
    assert len(body["results"]) == 5
    for hit in body["results"]:
        assert set(hit) == {"id", "score", "image_url", "caption"}
        image = httpx.get(live.url + hit["image_url"])
        assert image.status_code == 200 and image.headers["content-type"] == "image/jpeg"
        assert image.content == live.index.thumbnail(hit["id"])
    scores = [hit["score"] for hit in body["results"]]
    assert scores == sorted(scores, reverse=True)


def test_alpha_reranks_as_the_engine_does(live):
    orders = {}
    for alpha in (1.0, 0.0):
        params = {"text": "a small blue circle", "k": 40, "alpha": alpha}
        body = httpx.get(f"{live.url}/api/search", params=params).json()
        engine = live.index.search(
            live.encoder.text("a small blue circle"), live.encoder.weights(alpha), 40
        )
        assert [hit["id"] for hit in body["results"]] == [hit.id for hit in engine]
        assert body["weights"] == live.encoder.weights(alpha)
        orders[alpha] = [hit["id"] for hit in body["results"]]
    assert orders[1.0] != orders[0.0]


def test_image_upload_finds_the_image_and_its_captions(live, indexed):
    data = (indexed.retrieval.parent / "images" / "r000007.png").read_bytes()
    files = {"image": ("query.png", data, "image/png")}
    body = httpx.post(f"{live.url}/api/search", params={"k": 3, "alpha": 0.5}, files=files)
    assert body.status_code == 200, body.text
    assert body.json()["results"][0]["id"] == "images/r000007.png"
    params = {"k": 200, "target": "captions"}
    captions = httpx.post(f"{live.url}/api/search", params=params, files=files).json()["results"]
    assert len(captions) == 200 and all(hit["caption"] for hit in captions)


def test_the_page_and_its_files_are_served_with_a_strict_policy(live):
    page = httpx.get(live.url + "/")
    assert page.status_code == 200 and "threetowers search" in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    for name, kind in (("app.js", "javascript"), ("style.css", "css")):
        response = httpx.get(f"{live.url}/static/{name}")
        assert response.status_code == 200 and kind in response.headers["content-type"]
    info = httpx.get(live.url + "/api/info").json()
    assert info["images"] == 40 and info["captions"] == 200 and info["mixes"] is True


@pytest.mark.parametrize(
    ("params", "status", "message"),
    [
        ({}, 422, "text"),
        ({"text": "   "}, 400, "non-empty"),
        ({"text": "x" * 1001}, 400, "at most 1000"),
        ({"text": "a", "k": 0}, 400, "from 1 to 1000"),
        ({"text": "a", "k": 1001}, 400, "from 1 to 1000"),
        ({"text": "a", "k": "ten"}, 422, "k"),
        ({"text": "a", "alpha": 1.5}, 400, "from 0 to 1"),
        ({"text": "a", "alpha": "nan"}, 400, "from 0 to 1"),
        ({"text": "a", "alpha": "inf"}, 400, "from 0 to 1"),
        ({"text": "a", "target": "files"}, 400, "images, captions"),
        ({"text": "a", "weights": "f=0.5,x=0.5"}, 400, "weights"),
        ({"text": "a", "weights": "f=0.9"}, 400, "sum to 1"),
    ],
)
def test_bad_queries_get_one_clear_message(live, params, status, message):
    assert message in assert_error(httpx.get(f"{live.url}/api/search", params=params), status)


@pytest.mark.parametrize(
    "path",
    [
        "/images/missing.png",
        "/images/..%2F..%2Fmanifest.json",
        "/images/%2Fetc%2Fpasswd",
        "/images/images%2Fr000001.png%00",
        "/static/../search/build.py",
        "/static/server.py",
        "/api/nothing",
    ],
)
def test_unknown_ids_and_paths_are_404(live, path):
    assert_error(httpx.get(live.url + path), 404)


def test_uploads_are_bounded(live):
    url = f"{live.url}/api/search"
    assert "empty" in assert_error(httpx.post(url, files={"image": ("a", b"", "image/png")}), 400)
    junk = {"image": ("a.png", b"\x89PNG not really", "image/png")}
    assert "not an image" in assert_error(httpx.post(url, files=junk), 400)
    for side in (7_000, 20_000):  # above our limit; above Pillow's too
        bomb = {"image": ("bomb.png", bomb_png(side, side), "image/png")}
        assert "pixels" in assert_error(httpx.post(url, files=bomb), 413)
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, format="PNG")
    truncated = {"image": ("t.png", buffer.getvalue()[:2000], "image/png")}
    assert_error(httpx.post(url, files=truncated), 400)
    assert_error(httpx.post(url, files={"other": ("a.png", png(8, 8), "image/png")}), 422)
    big = b"\0" * (server_module.Limits().max_upload_bytes + 1)
    assert "larger" in assert_error(httpx.post(url, content=big), 413)

    def chunks():
        yield png(8, 8)

    assert "Content-Length" in assert_error(httpx.post(url, content=chunks()), 411)
    assert httpx.get(live.url + "/api/info").status_code == 200  # still serving


def test_requests_for_another_host_are_refused(live):
    response = httpx.get(live.url + "/api/info", headers={"host": "attacker.example"})
    assert "answers to" in assert_error(response, 400)


@SLOW
@given(
    text=st.text(min_size=0, max_size=1200),
    k=st.one_of(st.integers(-10, 5000), st.text(max_size=8)),
    alpha=st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8)),
    target=st.sampled_from(["images", "captions", "", "../etc", "IMAGES"]),
)
def test_hostile_text_queries_never_break_the_server(live, text, k, alpha, target):
    params = {"text": text, "k": k, "alpha": alpha, "target": target}
    response = httpx.get(f"{live.url}/api/search", params=params)
    if response.status_code == 200:
        results = response.json()["results"]
        assert 1 <= len(results) <= 200 and all(r["id"] in live.index.row_of for r in results)
    else:
        assert_error(response)


@SLOW
@given(data=st.binary(max_size=4096), name=st.text(max_size=40))
def test_hostile_uploads_never_break_the_server(live, data, name):
    files = {"image": (name or "x", data, "application/octet-stream")}
    response = httpx.post(f"{live.url}/api/search", files=files)
    if response.status_code != 200:
        assert_error(response)


@SLOW
@given(image_id=st.text(min_size=1, max_size=200))
def test_hostile_ids_never_reach_the_file_system(live, image_id):
    response = httpx.get(f"{live.url}/images/{quote(image_id, safe='/.%')}")
    if response.status_code == 200:
        assert response.content in {live.index.thumbnail(i) for i in live.index.ids}
    else:
        assert_error(response)


def test_serve_binds_loopback_unless_told_and_warns(indexed, monkeypatch, capsys, caplog):
    calls = []
    monkeypatch.setattr("uvicorn.Server.run", lambda server: calls.append(server.config))
    assert main(["serve", str(indexed.index_dir)]) == 0
    assert calls[-1].host == "127.0.0.1" and calls[-1].port == 8000
    assert calls[-1].http.func is connections.Connection  # the bounded protocol
    assert "http://127.0.0.1:8000/" in capsys.readouterr().out
    assert "not a loopback address" not in caplog.text
    assert main(["serve", str(indexed.index_dir), "--host", "0.0.0.0", "--port", "9000"]) == 0
    assert calls[-1].host == "0.0.0.0" and "not a loopback address" in caplog.text


def test_serve_refuses_what_is_not_an_index(tmp_path, capsys):
    assert main(["serve", str(tmp_path)]) == 2
    assert "threetowers index" in capsys.readouterr().err


def test_head_answers_wherever_get_does(live):
    image_url = f"/images/{quote(live.index.ids[0], safe='')}"
    search = "/api/search?text=a+red+star&k=3"
    for path in ["/", "/static/app.js", "/static/style.css", "/api/info", image_url, search,
                 "/images/missing.png", "/api/search"]:  # fmt: skip
        get, head = httpx.get(live.url + path), httpx.head(live.url + path)
        assert head.status_code == get.status_code != 405, path
        assert head.content == b"", path
        varying = {"date"} | ({"content-length"} if path == search else set())  # took_ms
        same = {name: value for name, value in get.headers.items() if name not in varying}
        assert {name: value for name, value in head.headers.items() if name not in varying} == same


def raw_request(url: str, request: bytes) -> httpx.Response:
    """``request`` sent as it is (httpx refuses what is too long), its answer parsed."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as connection:
        connection.sendall(request)
        answer = b""
        while data := connection.recv(65536):
            answer += data
    head, _, body = answer.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = [tuple(line.split(": ", 1)) for line in lines]
    return httpx.Response(int(status_line.split()[1]), headers=headers, content=body)


@pytest.mark.parametrize(
    ("request_bytes", "status", "message"),
    [
        (b"GET /api/search?text=" + b"a" * 2**20 + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
         414, "request line is longer"),
        (b"GET /api/info HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * 2**20 + b"\r\n\r\n",
         431, "headers are longer"),
        (b"NOT HTTP AT ALL\r\n\r\n", 400, "not an HTTP/1.1 request"),
    ],
)  # fmt: skip
def test_requests_h11_refuses_get_the_json_error(live, request_bytes, status, message):
    response = raw_request(live.url, request_bytes)
    assert message in assert_error(response, status)
    assert response.headers["connection"] == "close"
    assert httpx.get(live.url + "/api/info").status_code == 200  # still serving
