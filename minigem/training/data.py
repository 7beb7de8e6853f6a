"""Datasets for a stage and a deterministic, resumable batch order."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch.utils.data import Dataset, Sampler

from minigem.config import DataConfig
from minigem.data.records import Sample


def open_source(cfg: DataConfig, image_token: str = "<image>"):
    """A map-style source of `Sample`s for a DataConfig."""
    if cfg.synth is not None:
        from minigem.data.synth import SynthSource

        s = cfg.synth
        return SynthSource(s.n, s.seed, s.image_size, s.tasks, s.mix, s.max_turns, s.scene_as_text,
                           s.qa_turns, glyph_fill=s.glyph_fill, binding=s.binding)
    from minigem.data.llava_json import LlavaJsonDataset

    return LlavaJsonDataset(cfg.path, cfg.image_folder, cfg.skip_bad, image_token)


class EncodedDataset(Dataset):
    """Applies an encoder (Sample -> features dict) to a source of Samples."""

    def __init__(self, source, encode) -> None:
        self.source = source
        self.encode = encode

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> dict:
        sample: Sample = self.source[i]
        return self.encode(sample)

    def length(self, i: int, tokens_per_image: int) -> int:
        """Record i's length in words (an image counts as its visual tokens), without pixels."""
        return self.source.length(i, tokens_per_image)


class ResumableBatchSampler(Sampler[list[int]]):
    """Batches from a seeded permutation per epoch, starting at any global batch index.

    Global batch g of rank r (of W) holds perm[(g*W + r)*B : (g*W + r + 1)*B] of its epoch,
    so the data order depends only on (seed, g) and a resumed run sees exactly the batches
    an uninterrupted run would have.

    With `lengths` (index -> length), batches are grouped by length (HF's `group_by_length`):
    each run of `group` consecutive global batches of the permutation (a mega-batch) is sorted by
    length, cut into global batches again and those are put in a seeded random order. Every
    batch then pads to a similar width (the bundled recipe's padding falls from about half of
    every batch to a few percent); which records are seen in an epoch does not change.
    """

    def __init__(self, n: int, batch_size: int, seed: int, start: int = 0, total: int | None = None,
                 rank: int = 0, world: int = 1, lengths: Callable[[int], int] | None = None,
                 group: int = 16) -> None:
        self.n, self.b, self.seed = n, batch_size, seed
        self.start, self.total, self.rank, self.world = start, total, rank, world
        self.per_epoch = n // (batch_size * world)
        if self.per_epoch == 0:
            from minigem.errors import DataError

            raise DataError(f"dataset has {n} samples, fewer than one batch of {batch_size * world}")
        self.lengths, self.group = lengths, group

    def _perm(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return torch.randperm(self.n, generator=g)

    def _mega(self, perm: torch.Tensor, epoch: int, m: int) -> list[torch.Tensor]:
        """Mega-batch m of an epoch: its global batches, each sorted by length, in a seeded order."""
        width = self.b * self.world
        lo, hi = m * self.group, min((m + 1) * self.group, self.per_epoch)
        idx = perm[lo * width : hi * width]
        lens = torch.tensor([self.lengths(int(i)) for i in idx])
        idx = idx[torch.sort(lens, descending=True, stable=True).indices]
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch * 10_007 + m + 1)
        return [idx[j * width : (j + 1) * width] for j in torch.randperm(hi - lo, generator=g).tolist()]

    def __iter__(self) -> Iterator[list[int]]:
        g = self.start
        epoch, perm, mega, at = -1, None, None, -1
        while self.total is None or g < self.total:
            e, k = divmod(g, self.per_epoch)
            if e != epoch:
                epoch, perm, at = e, self._perm(e), -1
            if self.lengths is None:
                lo = (k * self.world + self.rank) * self.b
                yield perm[lo : lo + self.b].tolist()
            else:
                if k // self.group != at:
                    at = k // self.group
                    mega = self._mega(perm, e, at)
                yield mega[k % self.group][self.rank * self.b : (self.rank + 1) * self.b].tolist()
            g += 1

    def __len__(self) -> int:
        return (self.total or self.per_epoch) - self.start
