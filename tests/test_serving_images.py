"""Image input safety (data: URLs, decompression bombs, the remote-fetch address policy) and
the image-generation hook (unavailable by default; wired through when a generator is given)."""

from __future__ import annotations

import base64
import http.server
import io
import ipaddress
import struct
import threading
import zlib

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from minigem.serving.errors import APIError
from minigem.serving.images import decode_image, load_image
from minigem.serving.settings import RemoteImages, ServeSettings, public_address
from minigem.serving.testing import png_data_url


def png_bytes(size=(8, 8), fmt="PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (10, 200, 30)).save(buf, format=fmt)
    return buf.getvalue()


def bomb_png(side: int = 8_000) -> bytes:
    """A PNG whose header claims side x side pixels (a few hundred bytes on the wire)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * (side * 3 + 1))  # one row; the decoder would want all of them
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def error_of(fn, *args) -> APIError:
    with pytest.raises(APIError) as info:
        fn(*args)
    return info.value


@pytest.mark.parametrize("addr,ok", [
    ("8.8.8.8", True), ("2606:4700::1111", True), ("127.0.0.1", False), ("10.1.2.3", False),
    ("172.16.0.1", False), ("192.168.1.1", False), ("169.254.169.254", False),
    ("100.64.0.1", False), ("0.0.0.0", False), ("::1", False), ("fe80::1", False),
    ("::ffff:127.0.0.1", False), ("fd00::1", False), ("224.0.0.1", False),
])
def test_public_address_policy(addr, ok):
    assert public_address(ipaddress.ip_address(addr)) is ok


def test_data_urls_and_formats():
    s = ServeSettings()
    assert load_image(png_data_url(size=(5, 7)), s, "img").size == (5, 7)
    for fmt in ("JPEG", "GIF", "WEBP", "BMP"):
        url = f"data:image/x;base64,{base64.b64encode(png_bytes(fmt=fmt)).decode()}"
        assert load_image(url, s, "img").mode == "RGB"
    wrapped = "data:image/png;base64," + "\n".join(base64.b64encode(png_bytes()).decode())
    assert load_image(wrapped, s, "img").size == (8, 8)  # whitespace in base64 is fine
    tiff = "data:image/tiff;base64," + base64.b64encode(png_bytes(fmt="TIFF")).decode()
    assert "format TIFF is not accepted" in error_of(load_image, tiff, s, "img").message
    assert error_of(load_image, "data:image/png,rawbytes", s, "img").code == "invalid_image_url"
    assert error_of(load_image, "data:image/png;base64", s, "img").code == "invalid_image_url"
    for url in ("file:///etc/passwd", "/etc/passwd", "ftp://x/y.png", "C:\\a.png", "data"):
        assert error_of(load_image, url, s, "img").code == "invalid_image_url"


def test_decompression_bomb_is_refused_before_decoding():
    err = error_of(decode_image, bomb_png(), 4096 * 4096, "img")
    assert err.status == 413 and "8000x8000 = 64000000 pixels" in err.message
    err = error_of(decode_image, bomb_png(60_000), 10**12, "img")  # PIL's own net (3.6 Gpx)
    assert err.status == 413 and "decompression bomb" in err.message
    err = error_of(load_image, png_data_url(size=(64, 64)), ServeSettings(max_image_pixels=1000), "img")
    assert err.status == 413
    err = error_of(load_image, png_data_url(), ServeSettings(max_image_bytes=10), "img")
    assert err.status == 413 and "over the limit of 10" in err.message


class _Files(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802
        if self.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", "http://127.0.0.1:1/x.png")
            self.end_headers()
            return
        body = {"/ok.png": png_bytes((9, 9)), "/big.png": png_bytes((300, 300)) + b"\0" * 50_000}.get(self.path)
        self.send_response(200 if body else 404)
        self.end_headers()
        self.wfile.write(body or b"")

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def file_server():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Files)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()


def test_remote_images(file_server):
    off = ServeSettings()
    assert error_of(load_image, file_server + "/ok.png", off, "img").code == "remote_images_disabled"
    on = ServeSettings(remote_images=RemoteImages(enabled=True))
    for url in (file_server + "/ok.png", "http://localhost/x.png", "http://[::1]/x.png",
                "http://169.254.169.254/latest/meta-data", "http://10.0.0.1/x.png"):
        err = error_of(load_image, url, on, "img")
        assert err.code == "image_url_refused", url  # refused before any connection
    lab = RemoteImages(enabled=True, max_bytes=20_000, address_allowed=lambda ip: ip.is_loopback)
    local = ServeSettings(remote_images=lab)
    assert load_image(file_server + "/ok.png", local, "img").size == (9, 9)
    assert error_of(load_image, file_server + "/big.png", local, "img").status == 413
    assert "HTTP 302" in error_of(load_image, file_server + "/redirect", local, "img").message
    assert "HTTP 404" in error_of(load_image, file_server + "/nope.png", local, "img").message
    assert error_of(load_image, "http://user:pw@127.0.0.1/x.png", local, "img").code == "invalid_image_url"


class SolidGenerator:
    def generate(self, prompt: str, n: int = 1, size=None, seed=None) -> list[Image.Image]:
        return [Image.new("RGB", size or (32, 32), (len(prompt) % 256, 0, 0)) for _ in range(n)]


def test_image_generation_hook():
    from minigem.checkpoints.native import load_model
    from minigem.serving.api import create_app
    from minigem.serving.testing import tiny_checkpoint

    model = load_model(tiny_checkpoint())
    answer = "ok <h>a red square</h>"  # the answer's <h> span is what gets drawn
    model.tokenizer.decode = lambda ids, **kw: answer[:3 * len(ids)]
    app = create_app(model, ServeSettings(model_name="tiny"), image_generator=SolidGenerator())
    with TestClient(app) as c:
        assert c.get("/health").json()["image_generation"] is True
        r = c.post("/v1/images/generations", json={"prompt": "a red square", "n": 2, "size": "48x40"})
        assert r.status_code == 200 and len(r.json()["data"]) == 2
        im = Image.open(io.BytesIO(base64.b64decode(r.json()["data"][0]["b64_json"])))
        assert im.size == (48, 40)
        body = {"messages": [{"role": "user", "content": "draw"}], "max_tokens": 10, "temperature": 0,
                "modalities": ["text", "image"]}
        msg = c.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]
        assert msg["content"] == "ok a red square"
        url = msg["images"][0]["image_url"]["url"]
        assert url.startswith("data:image/png;base64,")
        im = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
        assert im.getpixel((0, 0)) == (len("a red square"), 0, 0)  # drawn from the span only
        r = c.post("/v1/images/generations", json={"prompt": "x", "size": "5x5"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "size"
