"""minigem: build, train, evaluate and serve multimodal vision-language models."""

from __future__ import annotations

__version__ = "0.1.0"


def load(path=None, device=None, dtype=None):
    """Load a native checkpoint directory (the bundled `tiny-shapes` model when path is None)."""
    from minigem.checkpoints.native import load_model

    return load_model(path, device=device, dtype=dtype)


__all__ = ["__version__", "load"]
