"""What the streaming reader yields (datasets/stream.py): a `Batch` of decoded samples, and the
skip records of the bad ones that travel with it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Skip:
    """A skip record that stands for `samples` bad samples: a shard that broke off is one record
    for all its unread samples. It unpacks and indexes as the (shard, key, kind, detail) of a
    plain record, which stands for one sample (`skipped_samples`); it is no tuple, since torch's
    batch conversion (default_convert, pin_memory) rebuilds tuples and would drop the count."""

    shard: str
    key: str
    kind: str
    detail: str
    samples: int = 1

    def _fields(self) -> tuple[str, str, str, str]:
        return (self.shard, self.key, self.kind, self.detail)

    def __iter__(self):
        return iter(self._fields())

    def __getitem__(self, index):
        return self._fields()[index]

    def __len__(self) -> int:
        return 4


def skipped_samples(record: tuple) -> int:
    return getattr(record, "samples", 1)


@dataclass
class Batch:
    """What a loader yields: decoded samples (or none, in a report of skipped ones) and what the
    trainer books for them. `positions` are the (epoch, shard, index) of every sample this batch
    used up, its own and the bad ones skipped since the last batch, so they can be marked used."""

    images: torch.Tensor | None  # uint8 [B, H, W, 3] images or float16 [B, R, C] feature rows
    labels: torch.Tensor | None  # int8 [B, num_labels]: +1 present, -1 absent, 0 unknown
    keys: list[str]
    epochs: list[int]  # each sample's epoch (the ledger)
    positions: list
    skipped: list  # skip records: (shard, key, kind, detail), or a Skip for a broken shard

    @property
    def has_samples(self) -> bool:
        return self.images is not None

    def pin_memory(self) -> "Batch":
        """DataLoader(pin_memory=True) calls this: page-locked tensors copy to the GPU asynchronously."""
        if not self.has_samples:
            return self
        return dataclasses.replace(self, images=self.images.pin_memory(), labels=self.labels.pin_memory())
