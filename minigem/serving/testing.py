"""Helpers for tests and benchmarks of the server: a tiny random model and a live server.

``tiny_model()`` builds a small random-weight model in seconds (no bundled model needed);
``LiveServer`` runs uvicorn in a background thread on a free 127.0.0.1 port.
"""

from __future__ import annotations

import atexit
import base64
import functools
import io
import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path

import torch
from PIL import Image

WORDS = (
    "What color is the circle? How many squares are there? Describe the image. "
    "The red square is left of the blue circle. yes no one two three four five six seven "
    "green yellow purple triangle star small large top bottom middle written letter"
).split()


def tiny_model(seed: int = 0, image_size: int = 32):
    """A random-weight VisionLanguageModel: ViT 1 layer, Llama 2 layers, width 64."""
    from minigem.chat import train_tokenizer
    from minigem.config import ModelConfig
    from minigem.model import VisionLanguageModel

    texts = [" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))]
    tok = train_tokenizer(texts, vocab_size=256)
    cfg = ModelConfig.model_validate({
        "vision": {"config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                              "num_attention_heads": 2, "image_size": image_size, "patch_size": 8},
                   "select_layer": -1},
        "llm": {"arch": "llama", "config": {
            "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 512,
            "tie_word_embeddings": False}},
        "system_prompt": "",
        "max_length": 512,
    })
    torch.manual_seed(seed)
    model = VisionLanguageModel.build(cfg, tok)
    with torch.no_grad():
        for p in model.language_model.parameters():  # peaked logits: no near-ties in greedy
            if p.ndim == 2:
                p.mul_(4.0)
        eos = tok.convert_tokens_to_ids(tok.eos_token)  # answers run to max_tokens
        model.language_model.get_output_embeddings().weight[eos].zero_()
    return model.eval()


def save_tiny_model(path: str | Path, seed: int = 0) -> Path:
    from minigem.checkpoints.native import save_model

    return save_model(tiny_model(seed), path)


@functools.cache
def tiny_checkpoint() -> Path:
    """``save_tiny_model`` once per process, in a temporary directory removed at exit."""
    root = Path(tempfile.mkdtemp(prefix="minigem-tiny-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    return save_tiny_model(root / "tiny")


def png_data_url(color: tuple[int, int, int] = (200, 30, 30), size: tuple[int, int] = (24, 24),
                 fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format=fmt)
    mime = "jpeg" if fmt == "JPEG" else fmt.lower()
    return f"data:image/{mime};base64," + base64.b64encode(buf.getvalue()).decode()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """uvicorn serving ``app`` in a thread; use as a context manager (``.url``)."""

    def __init__(self, app, port: int | None = None) -> None:
        import uvicorn

        self.app = app
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                lifespan="on", timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="minigem-live-server", daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
