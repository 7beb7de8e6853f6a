"""Safe image input: ``data:`` URLs, optional http(s) fetching behind an address policy, and
decoding with pixel and byte caps.

Never reads local files: ``file://`` URLs, paths and every other scheme are refused. Remote
fetching is off unless enabled; when on, the host is resolved once, every address must pass
``RemoteImages.address_allowed`` (public unicast by default: no loopback, private,
link-local...), and the connection goes to that checked address (so DNS cannot be re-bound
between the check and the fetch), without redirects, under a byte and a time cap.
"""

from __future__ import annotations

import base64
import binascii
import io
import ipaddress
import socket
import time
from urllib.parse import urlsplit, urlunsplit

from PIL import Image, UnidentifiedImageError

from minigem.serving.errors import APIError, bad_request
from minigem.serving.settings import RemoteImages, ServeSettings

FORMATS = {"PNG", "JPEG", "MPO", "GIF", "WEBP", "BMP"}  # MPO: multi-picture JPEG (cameras)


def load_image(url: str, settings: ServeSettings, where: str) -> Image.Image:
    """An RGB image from a data: URL (or an allowed http(s) URL); 400 with a clear message."""
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        data = decode_data_url(url, where)
    elif scheme in ("http", "https"):
        if not settings.remote_images.enabled:
            raise bad_request(f"{where}: remote image URLs are disabled on this server; send the "
                              "image inline as a data: URL (base64)", where, "remote_images_disabled")
        data = fetch(url, settings.remote_images, where)
    else:
        shown = scheme + ":" if scheme else "a URL without a scheme"
        raise bad_request(f"{where}: unsupported image URL ({shown}); send a data: URL "
                          "(data:image/png;base64,...)", where, "invalid_image_url")
    if len(data) > settings.max_image_bytes:
        raise APIError(413, f"{where}: image is {len(data)} bytes, over the limit of "
                       f"{settings.max_image_bytes}", where, "image_too_large")
    return decode_image(data, settings.max_image_pixels, where)


def decode_data_url(url: str, where: str) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep:
        raise bad_request(f"{where}: malformed data: URL (no comma)", where, "invalid_image_url")
    params = header[5:].split(";")
    if "base64" not in params[1:]:
        raise bad_request(f"{where}: data: URL must be base64-encoded (data:image/png;base64,...)",
                          where, "invalid_image_url")
    if params[0] and not params[0].lower().startswith("image/"):
        raise bad_request(f"{where}: data: URL has media type {params[0]!r}, not an image",
                          where, "invalid_image")
    try:
        return base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError):
        raise bad_request(f"{where}: broken base64 in the data: URL", where, "invalid_base64") from None


def decode_image(data: bytes, max_pixels: int, where: str) -> Image.Image:
    """Decode fully (size checked from the header before any pixel is decoded; PIL's own
    bomb check in ``Image.open`` stays on as a second net)."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.format not in FORMATS:
                raise bad_request(f"{where}: image format {im.format} is not accepted "
                                  f"(use {', '.join(sorted(FORMATS - {'MPO'}))})", where, "invalid_image")
            w, h = im.size
            if w < 1 or h < 1 or w * h > max_pixels:
                raise APIError(413, f"{where}: image is {w}x{h} = {w * h} pixels, over the limit "
                               f"of {max_pixels}", where, "image_too_large")
            im.load()
            return im.convert("RGB")
    except UnidentifiedImageError:
        raise bad_request(f"{where}: the data is not an image", where, "invalid_image") from None
    except Image.DecompressionBombError:
        raise APIError(413, f"{where}: image is too large (decompression bomb)", where,
                       "image_too_large") from None
    except (OSError, ValueError, SyntaxError, EOFError) as err:
        raise bad_request(f"{where}: truncated or corrupt image ({err})", where, "invalid_image") from None


def _checked_address(host: str, port: int, policy: RemoteImages, where: str) -> str:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        raise bad_request(f"{where}: cannot resolve host {host!r}", where, "image_fetch_failed") from None
    addrs = [ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos]
    refused = [a for a in addrs if not policy.address_allowed(a)]
    if not addrs or refused:
        raise bad_request(f"{where}: refusing to fetch from {host}: it resolves to a loopback, "
                          "private, link-local or otherwise non-public address", where, "image_url_refused")
    return str(addrs[0])


def fetch(url: str, policy: RemoteImages, where: str) -> bytes:
    import httpx

    parts = urlsplit(url)
    host = parts.hostname
    if not host or parts.username or parts.password:
        raise bad_request(f"{where}: malformed image URL", where, "invalid_image_url")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise bad_request(f"{where}: malformed image URL (port)", where, "invalid_image_url") from None
    ip = _checked_address(host, port, policy, where)
    netloc = (f"[{ip}]" if ":" in ip else ip) + f":{port}"
    pinned = urlunsplit((parts.scheme, netloc, parts.path or "/", parts.query, ""))
    deadline = time.monotonic() + policy.timeout_s
    chunks, total = [], 0
    try:
        with httpx.Client(timeout=policy.timeout_s, follow_redirects=False, trust_env=False) as client:
            with client.stream("GET", pinned, headers={"Host": parts.netloc.rsplit("@", 1)[-1]},
                               extensions={"sni_hostname": host}) as resp:
                if resp.status_code != 200:
                    raise bad_request(f"{where}: fetching the image answered HTTP {resp.status_code}",
                                      where, "image_fetch_failed")
                for chunk in resp.iter_bytes():
                    total += len(chunk)
                    if total > policy.max_bytes:
                        raise APIError(413, f"{where}: remote image is over {policy.max_bytes} bytes",
                                       where, "image_too_large")
                    if time.monotonic() > deadline:
                        raise bad_request(f"{where}: fetching the image took over {policy.timeout_s} s",
                                          where, "image_fetch_timeout")
                    chunks.append(chunk)
    except httpx.HTTPError as err:
        raise bad_request(f"{where}: cannot fetch the image: {type(err).__name__}", where,
                          "image_fetch_failed") from None
    return b"".join(chunks)
