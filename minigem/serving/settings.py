"""Server settings: the engine's batch and queue sizes, and every limit on what a client may send.

Defaults are safe for a server on 127.0.0.1: no remote image fetching, modest limits. The
CLI (`minigem serve`) maps its flags onto these fields.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable

from pydantic import BaseModel, ConfigDict, Field

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def public_address(ip: IPAddress) -> bool:
    """True for globally routable unicast addresses (no loopback, private, link-local...)."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not (ip.is_multicast or ip.is_reserved or ip.is_unspecified)


class RemoteImages(BaseModel):
    """Fetching http(s) image URLs: off unless enabled; public addresses only when on."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    enabled: bool = False
    max_bytes: int = Field(5 * 2**20, gt=0)
    timeout_s: float = Field(5.0, gt=0)
    # which resolved addresses may be contacted (tests swap this to reach a local server)
    address_allowed: Callable[[IPAddress], bool] = public_address


class ServeSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model_name: str = "minigem"
    api_key: str | None = None  # None: no authentication
    # engine
    max_batch: int = Field(8, ge=1)  # rows decoded together
    max_queue: int = Field(64, ge=1)  # requests waiting for a batch slot; more -> 429
    max_wait_steps: int = Field(8, ge=0)  # decode steps newcomers may wait to be prefilled together
    gather_ms: float = Field(10.0, ge=0)  # an idle engine waits this long for announced requests
    timeout_s: float = Field(120.0, gt=0)  # per request, from arrival to the last token
    retry_after_s: int = Field(1, ge=1)
    # request limits
    max_body_bytes: int = Field(16 * 2**20, gt=0)
    max_images: int = Field(8, ge=0)  # per request, across the conversation
    max_image_bytes: int = Field(8 * 2**20, gt=0)  # one decoded file
    max_image_pixels: int = Field(4096 * 4096, gt=0)  # width * height (decompression bombs)
    max_messages: int = Field(64, ge=1)
    max_prompt_tokens: int | None = None  # None: the model's max_length
    max_tokens_limit: int = Field(1024, ge=1)  # cap on `max_tokens`
    default_max_tokens: int = Field(256, ge=1)
    remote_images: RemoteImages = Field(default_factory=RemoteImages)
