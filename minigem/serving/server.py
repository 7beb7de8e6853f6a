"""``minigem serve``: load a model, build the app, run uvicorn (127.0.0.1 unless told otherwise)."""

from __future__ import annotations

import ipaddress
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import ValidationError

from minigem.errors import MinigemError
from minigem.serving.settings import RemoteImages, ServeSettings

if TYPE_CHECKING:
    import torch

log = logging.getLogger("minigem.serving")


def model_name(path: str | None) -> str:
    return "minigem-tiny-shapes" if path is None else Path(path).expanduser().resolve().name


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(model_path: str | None, host: str = "127.0.0.1", port: int = 8000,
          api_key: str | None = None, threads: int | None = None,
          image_pipeline: str | Path | None = None,
          device: tuple[torch.device, torch.dtype] | None = None, **limits) -> int:
    """Blocking: serve until interrupted. ``limits``: ServeSettings fields (+ remote_images).

    ``image_pipeline``: a diffusers text-to-image directory for image generation (None: off).
    ``device``: (device, dtype) for the model (None: CPU, fp32).
    """
    if not 0 < port < 65536:
        raise MinigemError(f"--port must be in 1..65535, got {port}")
    import torch
    import uvicorn

    from minigem.checkpoints.native import load_model
    from minigem.serving.api import create_app

    api_key = api_key or os.environ.get("MINIGEM_API_KEY") or None
    if not is_loopback(host) and api_key is None:
        log.warning("serving on %s without an API key: anyone who can reach it can use it", host)
    # torch's default (every core) leaves none for the HTTP side, and its spinning threads
    # then fight the event loop: keep one core free unless told otherwise
    torch.set_num_threads(threads or max(1, (os.cpu_count() or 2) - 1))
    try:
        remote = RemoteImages(enabled=bool(limits.pop("allow_remote_images", False)))
        settings = ServeSettings(model_name=model_name(model_path), api_key=api_key, remote_images=remote,
                                 **{k: v for k, v in limits.items() if v is not None})
    except ValidationError as err:
        first = err.errors()[0]
        raise MinigemError(f"serve: {'.'.join(map(str, first['loc']))}: {first['msg']}") from None
    bridge = None
    if image_pipeline is not None:
        from minigem.imagegen.bridge import DiffusionBridge

        bridge = DiffusionBridge(image_pipeline)
    dev, dtype = device or (None, None)
    model = load_model(model_path, device=dev, dtype=dtype)
    if bridge is not None:
        bridge.load()  # now rather than in the first request
        print(f"minigem: image generation with {bridge.path}", flush=True)
    app = create_app(model, settings, image_generator=bridge)
    print(f"minigem: serving {settings.model_name} on http://{host}:{port}/ (API at /v1, docs at /docs)",
          flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=5)
    return 0
