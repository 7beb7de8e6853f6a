"""DiffusionBridge: a local diffusers text-to-image pipeline directory behind one ``generate``.

Any directory written by ``DiffusionPipeline.save_pretrained`` works (SDXL, SD 1.5, the
bundled ``tiny-shapes-t2i``): diffusers classes load through ``DiffusionPipeline``, and a
``_class_name`` of minigem's own (``PIPELINE_CLASSES``) through that class. Building a
bridge only checks the directory; diffusers is imported, and the pipeline loaded (offline,
``local_files_only``), when the first image is generated.
"""

from __future__ import annotations

import importlib
import inspect
import json
import logging
import threading
import warnings
from pathlib import Path
from typing import Any

from PIL import Image

from minigem.errors import ImagePipelineError, MinigemError

log = logging.getLogger("minigem.imagegen")

BUNDLED_T2I = Path(__file__).resolve().parent.parent / "assets" / "tiny-shapes-t2i"
# pipeline classes that are not part of diffusers: _class_name -> "module:attribute"
PIPELINE_CLASSES = {"TinyT2IPipeline": "minigem.imagegen.t2i:TinyT2IPipeline"}
DTYPES = ("float32", "float16", "bfloat16")


def default_pipeline() -> Path | None:
    """The bundled text-to-image pipeline, or None when it is not installed."""
    return BUNDLED_T2I if (BUNDLED_T2I / "model_index.json").is_file() else None


def resolve_pipeline(path: str | Path | None) -> Path:
    """``path`` as a Path; None means the bundled pipeline (an error when there is none)."""
    if path is not None:
        return Path(path).expanduser()
    found = default_pipeline()
    if found is None:
        raise ImagePipelineError(
            f"no text-to-image pipeline is available: the bundled one ({BUNDLED_T2I}) is not "
            "installed; give a diffusers pipeline directory (--image-pipeline DIR)")
    return found


def check_pipeline_dir(path: Path) -> dict[str, Any]:
    """The parsed model_index.json of a pipeline directory whose components all exist."""
    if not path.exists():
        raise ImagePipelineError(f"{path}: no such text-to-image pipeline directory")
    if not path.is_dir():
        raise ImagePipelineError(f"{path}: not a directory (a text-to-image pipeline is a directory)")
    index = path / "model_index.json"
    if not index.is_file():
        raise ImagePipelineError(f"{path}: not a diffusers pipeline directory (no model_index.json)")
    try:
        data = json.loads(index.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ImagePipelineError(f"{index}: not valid JSON ({err})") from None
    if not isinstance(data, dict) or not isinstance(data.get("_class_name"), str):
        raise ImagePipelineError(f"{index}: no \"_class_name\" naming the pipeline class")
    for name, spec in data.items():
        if name.startswith("_") or not (isinstance(spec, list) and len(spec) == 2 and all(spec)):
            continue  # settings, and optional components saved as [null, null]
        sub = path / name
        if not sub.is_dir() or not any(sub.iterdir()):
            raise ImagePipelineError(
                f"{path}: the pipeline's {name!r} component ({spec[1]}) is missing: "
                f"{sub} is not a directory with files")
    return data


class DiffusionBridge:
    """Text-to-image through a local diffusers pipeline; an ``ImageGenerator``.

    ``steps``, ``guidance``, ``size`` (width, height) and ``negative_prompt`` default to
    the pipeline's own defaults when None; ``generate`` may override them per call.
    ``device`` None picks CUDA when available; ``dtype`` None is float16 on CUDA for
    diffusers pipelines and float32 otherwise. Calls are serialised (a pipeline's
    scheduler is stateful), so one bridge may serve several threads.
    """

    def __init__(self, path: str | Path | None = None, device: str | None = None,
                 dtype: str | None = None, steps: int | None = None, guidance: float | None = None,
                 size: tuple[int, int] | None = None, negative_prompt: str | None = None) -> None:
        self.path = resolve_pipeline(path)
        self.index = check_pipeline_dir(self.path)
        self.class_name: str = self.index["_class_name"]
        if dtype is not None and dtype not in DTYPES:
            raise MinigemError(f"dtype: {dtype!r} is not one of {', '.join(DTYPES)}")
        _check_options(steps, guidance, size)
        self.device, self.dtype = device, dtype
        self.steps, self.guidance, self.size = steps, guidance, size
        self.negative_prompt = negative_prompt
        self._pipe: Any = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"DiffusionBridge({str(self.path)!r}, class={self.class_name})"

    # ------------------------------------------------------------------ loading

    def load(self) -> Any:
        """The loaded pipeline (loaded once, on first use)."""
        with self._lock:
            if self._pipe is None:
                self._pipe = self._load()
            return self._pipe

    def _load(self) -> Any:
        import torch

        device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        cls = self._pipeline_class()
        name = self.dtype or ("float16" if device.startswith("cuda")
                              and self.class_name not in PIPELINE_CLASSES else "float32")
        try:
            with warnings.catch_warnings():  # newer diffusers call it `dtype`; older only know this
                warnings.filterwarnings("ignore", "`torch_dtype` is deprecated", FutureWarning)
                pipe = cls.from_pretrained(str(self.path), torch_dtype=getattr(torch, name),
                                           local_files_only=True)
        except Exception as err:  # whatever the loader trips on, the directory is broken
            raise ImagePipelineError(
                f"{self.path}: cannot load the {self.class_name} pipeline: {err}") from err
        pipe = pipe.to(device)
        pipe.set_progress_bar_config(disable=True)
        log.info("loaded %s from %s on %s (%s)", self.class_name, self.path, device, name)
        return pipe

    def _pipeline_class(self) -> Any:
        try:
            import diffusers
        except ImportError:
            raise MinigemError("image generation needs diffusers: pip install 'minigem[gen]'") from None
        if self.class_name in PIPELINE_CLASSES:
            module, attr = PIPELINE_CLASSES[self.class_name].split(":")
            return getattr(importlib.import_module(module), attr)
        if not hasattr(diffusers, self.class_name):
            raise ImagePipelineError(
                f"{self.path / 'model_index.json'}: unknown pipeline class {self.class_name!r} "
                f"(not in diffusers {diffusers.__version__}, nor one of minigem's: "
                f"{', '.join(PIPELINE_CLASSES)})")
        return diffusers.DiffusionPipeline

    # ------------------------------------------------------------------ generating

    def generate(self, prompt: str, n: int = 1, size: tuple[int, int] | None = None,
                 seed: int | None = None, *, steps: int | None = None,
                 guidance: float | None = None,
                 negative_prompt: str | None = None) -> list[Image.Image]:
        """``n`` images for ``prompt``; the same seed and settings give the same pixels."""
        if n < 1:
            raise MinigemError(f"n: at least 1 image, got {n}")
        _check_options(steps, guidance, size)
        size = size or self.size
        pipe = self.load()
        import torch

        asked: dict[str, Any] = {
            "num_inference_steps": steps or self.steps,
            "guidance_scale": self.guidance if guidance is None else guidance,
            "negative_prompt": negative_prompt or self.negative_prompt,
            "width": size[0] if size else None,
            "height": size[1] if size else None,
            # a CPU generator: the same seed gives the same noise on every device
            "generator": None if seed is None else torch.Generator("cpu").manual_seed(seed),
        }
        kwargs = {"prompt": prompt, "num_images_per_prompt": n, "output_type": "pil",
                  **{k: v for k, v in asked.items() if v is not None}}
        kwargs = self._supported(pipe, kwargs)
        calls = 1 if "num_images_per_prompt" in kwargs else n  # else one image per call
        images: list[Image.Image] = []
        with self._lock, torch.inference_mode():
            for _ in range(calls):
                try:
                    out = pipe(**kwargs)
                except ValueError as err:  # diffusers' checks on sizes, prompts, steps
                    raise MinigemError(f"image generation failed: {err}") from None
                images += out.images if hasattr(out, "images") else out[0]
        if not all(isinstance(im, Image.Image) for im in images):
            raise MinigemError(f"the {self.class_name} pipeline did not return PIL images")
        return images

    def _supported(self, pipe: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        """The call's keyword arguments that the pipeline accepts (others are logged)."""
        params = inspect.signature(pipe.__call__).parameters
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            return kwargs
        for k in kwargs:
            if k not in params and k not in ("output_type", "num_images_per_prompt"):
                log.warning("the %s pipeline has no %r option: ignored", self.class_name, k)
        return {k: v for k, v in kwargs.items() if k in params}


def _check_options(steps: int | None, guidance: float | None, size: tuple[int, int] | None) -> None:
    if steps is not None and steps < 1:
        raise MinigemError(f"steps: at least 1, got {steps}")
    if guidance is not None and guidance < 0:
        raise MinigemError(f"guidance: must be >= 0, got {guidance}")
    if size is not None and (len(size) != 2 or min(size) < 1):
        raise MinigemError(f"size: (width, height) of positive integers, got {size}")


def parse_size(text: str) -> tuple[int, int]:
    """``"512"`` or ``"640x480"`` (width x height) -> (width, height)."""
    w, sep, h = text.lower().partition("x")
    try:
        size = (int(w), int(h if sep else w))
    except ValueError:
        raise MinigemError(f"size: {text!r} is not WIDTHxHEIGHT (e.g. 512x512) or one number") from None
    _check_options(None, None, size)
    return size
