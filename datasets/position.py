"""Where a training run is in its data, exactly: which samples of which epoch have been used.

Every sample read carries its position (epoch, shard index, index within the shard). The trainer
marks a position used once the step holding it (or the skip record of a bad sample) is done.
At a checkpoint the workers' marks are merged into one `DataPosition`: per unfinished epoch,
one bitset per shard. It is small (one bit per sample of the epochs in flight) and does not
depend on the number of workers, so a run resumes on any number of them:

- an epoch's shard order comes from (seed, epoch) alone;
- an epoch that was under way is finished first: its shards that still hold unused samples are
  dealt out to the new workers, which skip the used samples while reading;
- later epochs are dealt out as usual.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field

import numpy as np


@dataclass
class DataPosition:
    sizes: list[int]  # samples per shard, from dataset.json
    used: dict[int, dict[int, np.ndarray]] = field(default_factory=dict)  # epoch -> shard -> bool[n]
    completed_epochs: int = 0  # every epoch below this one is fully used

    def mark(self, positions) -> None:
        """positions: iterable of (epoch, shard, index)."""
        for epoch, shard, index in positions:
            if epoch < self.completed_epochs:
                raise ValueError(f"sample {shard}:{index} of completed epoch {epoch} used again")
            bits = self.used.setdefault(int(epoch), {}).get(int(shard))
            if bits is None:
                bits = self.used[int(epoch)][int(shard)] = np.zeros(self.sizes[int(shard)], dtype=bool)
            bits[int(index)] = True
        self._retire_completed()

    def _retire_completed(self) -> None:
        while self.completed_epochs in self.used and self.epoch_done(self.completed_epochs):
            del self.used[self.completed_epochs]
            self.completed_epochs += 1

    def epoch_done(self, epoch: int) -> bool:
        shards = self.used.get(epoch, {})
        return len(shards) == len(self.sizes) and all(bits.all() for bits in shards.values())

    def unused(self, epoch: int, shard: int) -> np.ndarray | None:
        """Mask of the samples still to read in (epoch, shard); None when the epoch is untouched."""
        if epoch < self.completed_epochs:
            return np.zeros(self.sizes[shard], dtype=bool)
        if epoch not in self.used:
            return None
        bits = self.used[epoch].get(shard)
        return np.ones(self.sizes[shard], dtype=bool) if bits is None else ~bits

    def to_json(self) -> dict:
        return {
            "sizes": self.sizes,
            "completed_epochs": self.completed_epochs,
            "used": {
                str(e): {str(s): base64.b64encode(np.packbits(bits)).decode() for s, bits in shards.items()}
                for e, shards in self.used.items()
            },
        }

    @classmethod
    def from_json(cls, data: dict) -> "DataPosition":
        sizes = [int(n) for n in data["sizes"]]
        used = {
            int(e): {
                int(s): np.unpackbits(np.frombuffer(base64.b64decode(b), np.uint8))[: sizes[int(s)]].astype(bool)
                for s, b in shards.items()
            }
            for e, shards in data["used"].items()
        }
        return cls(sizes, used, int(data["completed_epochs"]))
