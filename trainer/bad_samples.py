"""Counting the samples the reader skipped, per worker and then over all workers.

The reader (datasets/stream.py) attaches (shard, key, kind, detail) records to batches; a long
run must neither die on them nor hide them, so they are counted by kind, the first few are
printed with shard and key, and the totals land in metrics.json and MLflow. A shard that broke
off is one record that counts as all its unread samples (datasets/stream.py, `Skip`), so
data.max_bad_fraction sees 40% of the shards unreadable as 40% bad, not as one sample per shard.
"""

from __future__ import annotations

from collections import Counter

import torch.distributed as dist

from datasets.batch import skipped_samples
from datasets.contract import DatasetError
from trainer.distributed import distributed

EXAMPLES_KEPT = 20


class TooManyBadSamples(DatasetError):
    """More than data.max_bad_fraction of the samples read were bad: the data, not the run, is
    broken, so a restart would meet them again (not retried, trainer/failures.py)."""


class BadSampleLog:
    def __init__(self, rank: int = 0, max_fraction: float = 1.0, min_read: int = 200):
        self.rank, self.max_fraction, self.min_read = rank, max_fraction, min_read
        self.by_kind: Counter = Counter()
        self.examples: list[dict] = []
        self.read = 0

    @property
    def count(self) -> int:
        return sum(self.by_kind.values())

    def add(self, batch: dict) -> None:
        self.read += len(batch.keys) + sum(map(skipped_samples, batch.skipped))
        for record in batch.skipped:
            shard, key, kind, detail = record
            self.by_kind[kind] += skipped_samples(record)
            if len(self.examples) < EXAMPLES_KEPT:
                self.examples.append({"shard": shard, "key": key, "kind": kind, "detail": detail})
                print(
                    f"[rank {self.rank}] skipped bad sample: shard {shard} key {key}: {kind}"
                    + (f" ({detail})" if detail else ""),
                    flush=True,
                )
        if self.read >= self.min_read and self.count > self.max_fraction * self.read:
            raise TooManyBadSamples(
                f"{self.count} of {self.read} samples read on rank {self.rank} were bad "
                f"(more than data.max_bad_fraction={self.max_fraction}): {dict(self.by_kind)}; "
                f"first: {self.examples[:3]}"
            )

    def summary(self) -> dict:
        """Totals over all workers (a collective: every rank must call it)."""
        mine = {"read": self.read, "by_kind": dict(self.by_kind), "examples": self.examples}
        parts = [mine]
        if distributed():
            parts = [None] * dist.get_world_size()
            dist.all_gather_object(parts, mine)
        total: Counter = Counter()
        for part in parts:
            total.update(part["by_kind"])
        examples = [e for part in parts for e in part["examples"]][:EXAMPLES_KEPT]
        return {
            "count": sum(total.values()),
            "read": sum(p["read"] for p in parts),
            "by_kind": dict(total),
            "examples": examples,
        }
