"""What a run's numbers depend on besides its recipe: the CPU kernels, threads, library versions.

Runs on one machine replay bit for bit (same seeds, same data order), but not across machines:
PyTorch picks its CPU kernels by instruction set (AVX2, AVX-512, ...), and kernels that sum in
another order round differently. Training is chaotic enough that such a difference in the last
bit grows into a different model within a few hundred steps (docs/training.md, "Outputs,
checkpoints and resume"). So every `minigem train` call appends what it ran under to
`OUT/environment.json`, and a resume that runs under something else says so.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import torch

from minigem.fileio import atomic_write

log = logging.getLogger(__name__)

FILE = "environment.json"
# environment variables that change which kernels run (and so the rounding)
KERNEL_VARS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "MKL_CBWR",
               "OMP_NUM_THREADS", "CUBLAS_WORKSPACE_CONFIG")
PACKAGES = ("transformers", "tokenizers", "accelerate", "timm", "numpy", "pillow", "safetensors")
# the fields that decide the numbers; the others (time, resume point, commit) are for the record
NUMERIC = ("torch", "cpu_capability", "cpu", "threads", "kernel_env", "packages", "device", "bf16",
           "processes")


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux, else what `platform` knows)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _commit() -> str | None:
    """The git commit of minigem's checkout when it runs from one (an editable install), with
    "-dirty" when tracked files have uncommitted changes."""
    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return None
    try:
        def git(*args: str) -> str:
            return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True,
                                  timeout=10, check=True).stdout.strip()

        sha = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return None
    return sha + "-dirty" if dirty else sha


def describe(device: torch.device | str, bf16: bool, processes: int = 1) -> dict:
    """This process's environment, as recorded in environment.json."""
    device = torch.device(device)
    return {
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu": cpu_name(),
        "threads": torch.get_num_threads(),
        "kernel_env": {k: os.environ[k] for k in KERNEL_VARS if k in os.environ},
        "packages": {p: _version(p) for p in PACKAGES},
        "device": device.type if device.type != "cuda" else torch.cuda.get_device_name(device),
        "bf16": bool(bf16),
        "processes": processes,
        "python": platform.python_version(),
        "commit": _commit(),
    }


def differences(before: dict, now: dict) -> list[str]:
    """The numeric fields that differ, as 'field: before -> now'."""
    return [f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in NUMERIC if before.get(k) != now.get(k)]


def record(out: Path, info: dict, resumed_from: str | None = None) -> list[str]:
    """Append `info` (with the time and the resume point) to OUT/environment.json, atomically.

    Returns the differences from the entry the run's last call ran under (none for a new run);
    a resume that differs is logged as a warning: its losses will not replay those of a run
    left uninterrupted on the first machine. A new run (not resumed) starts the file afresh.
    """
    path = Path(out) / FILE
    entries: list[dict] = []
    if resumed_from is not None and path.exists():
        try:
            entries = json.loads(path.read_text())["calls"]
        except (ValueError, KeyError, TypeError) as e:
            log.warning("%s is not a valid environment record (%s); starting it afresh", path, e)
            entries = []
    diff = differences(entries[-1], info) if entries else []
    if diff:
        log.warning("resuming %s under another environment than its last call (%s); the losses "
                    "will not replay an uninterrupted run bit for bit", out, "; ".join(diff))
    entry = {**info, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "resumed_from": resumed_from,
             "argv": sys.argv[1:]}
    atomic_write(path, (json.dumps({"calls": [*entries, entry]}, indent=1) + "\n").encode())
    return diff
