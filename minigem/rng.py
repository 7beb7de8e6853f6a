"""Random streams for model parts that a plain LLaVA does not have."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def own_stream(tag: int) -> Iterator[None]:
    """Initialise what is built inside from a stream of its own, leaving torch's global RNG as it
    was: the parts built after (and before) get the weights they would get without it.

    The stream's seed is drawn from the global RNG inside a fork (so it follows the run's seed)
    and mixed with ``tag``, so two extras built at the same point draw different weights. Used for
    Mini-Gemini's HR tower and mining projections: a Mini-Gemini's LR tower, projector and LLM
    start from exactly the weights a LLaVA of the same config and seed starts from, so the two arms
    of an ablation differ only in the HR path."""
    with torch.random.fork_rng(devices=[]):
        seed = int(torch.randint(0, 2**62, (1,)).item()) ^ tag
        torch.manual_seed(seed)
        yield
