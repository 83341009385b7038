"""Benchmark: the streaming reader against its ceiling, decoding the same JPEGs in a tight loop.

    .venv/bin/python benchmarks/loader.py [--images 3000] [--side 256] [--size 224]

Both sides use the same decoder (datasets/stream.py's decode_image: PIL decode, short side
resized, centre crop). The ceiling holds the JPEG bytes in memory and decodes them one after
another; the reader streams the same images from tar shards on disk through every stage (shard
list, tar read, shuffle buffer, label decode, batching), in-process and in 1 and 2 DataLoader
processes. Reported: samples/s and the ratio to the ceiling, per loader process, as medians over
--repeats rounds (each round measures the ceiling and then every reader).

A second table prices how make_loader starts its loader process (from a fork server) against a
fork of the iterating process, the baseline: seconds to the first batch and samples/s after it.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from datasets.contract import Shard  # noqa: E402
from datasets.makers.shards import SplitWriter, encode_jpeg, encode_labels  # noqa: E402
from datasets.stream import ShardStream, StreamSpec, decode_image, make_loader  # noqa: E402

NUM_LABELS = 7586
BATCH = 32


def make_images(count: int, side: int) -> list[bytes]:
    rng = np.random.default_rng(0)
    images = []
    for _ in range(count):
        small = rng.integers(0, 255, (side // 16, side // 16, 3), dtype=np.uint8)
        image = np.kron(small, np.ones((16, 16, 1), dtype=np.uint8))  # smooth blocks: realistic JPEG sizes
        image = np.clip(image + rng.normal(0, 8, image.shape), 0, 255).astype(np.uint8)
        images.append(encode_jpeg(image))
    return images


def write(root: str, images: list[bytes]) -> list[Shard]:
    rng = np.random.default_rng(1)
    with SplitWriter(root, "train", maxcount=250) as writer:
        for i, jpg in enumerate(images):
            labels = rng.choice(NUM_LABELS, 8, replace=False)
            writer.write(f"img{i:07d}", {"jpg": jpg, "labels.json": encode_labels(labels[:3], labels[3:])})
    return [Shard(f"{root}/{path}", n) for path, n in writer.shards]


def ceiling(images: list[bytes], size: int) -> float:
    start = time.perf_counter()
    for jpg in images:
        decode_image(jpg, size)
    return len(images) / (time.perf_counter() - start)


def reader(shards: list[Shard], size: int, loaders: int, passes: int = 1) -> float:
    spec = StreamSpec(shards=shards, num_labels=NUM_LABELS, image_size=size, batch_size=BATCH, train=False)
    start, count = time.perf_counter(), 0
    for _ in range(passes):
        for batch in make_loader(spec, loaders):
            count += len(batch.keys)
    return count / (time.perf_counter() - start)


class PremadeBatches(torch.utils.data.IterableDataset):
    """Batches stacked exactly as the reader's `batched` stage stacks them, with no reading or
    decoding: through a DataLoader process this costs only the hand-over to the trainer."""

    def __init__(self, size: int, batch: int, count: int):
        self.size, self.batch, self.count = size, batch, count

    def __iter__(self):
        images = [np.full((self.size, self.size, 3), i, np.uint8) for i in range(self.batch)]
        labels = [np.zeros(NUM_LABELS, np.int8)] * self.batch
        for _ in range(self.count):
            yield {"images": torch.from_numpy(np.stack(images)), "labels": torch.from_numpy(np.stack(labels))}


def handover_seconds(size: int, batch: int = BATCH, count: int = 200) -> float:
    """Seconds per batch to receive a stacked batch from one loader process."""
    batches = iter(torch.utils.data.DataLoader(PremadeBatches(size, batch, count), batch_size=None, num_workers=1))
    next(batches)
    start = time.perf_counter()
    received = sum(1 for _ in batches)
    return (time.perf_counter() - start) / received


def start_methods(shards: list[Shard], size: int, repeats: int) -> list[dict]:
    """One loader process forked from this process (the baseline) against one started from the
    fork server (make_loader, whose server is already up): medians of the seconds to the first
    batch and of samples/s after it; ratio = samples/s over the baseline's in the same round."""
    spec = StreamSpec(shards=shards, num_labels=NUM_LABELS, image_size=size, batch_size=BATCH, train=False)
    forked = "start: fork of this process (baseline)"
    makers = {
        forked: lambda: torch.utils.data.DataLoader(
            ShardStream(spec), batch_size=None, num_workers=1, multiprocessing_context="fork"
        ),
        "start: fork server (make_loader)": lambda: make_loader(spec, 1),
    }
    first, rate = {name: [] for name in makers}, {name: [] for name in makers}
    for _ in range(repeats):
        for name, make in makers.items():
            start = time.perf_counter()
            batches = iter(make())
            next(batches)
            first[name].append(time.perf_counter() - start)
            start, count = time.perf_counter(), sum(len(b.keys) for b in batches)
            rate[name].append(count / (time.perf_counter() - start))
    ratios = {name: [r / b for r, b in zip(rate[name], rate[forked])] for name in makers}
    return [
        {
            "stage": name,
            "first_batch_s": float(np.median(first[name])),
            "samples_per_s": float(np.median(rate[name])),
            "ratio": float(np.median(ratios[name])),
            "ratios": ratios[name],
        }
        for name in makers
    ]


def run(images: int, side: int, size: int, repeats: int) -> list[dict]:
    """Each repeat measures the ceiling and then every reader right after it, so a ratio compares
    figures taken moments apart (a shared VM's speed drifts); the medians over repeats are kept."""
    jpgs = make_images(images, side)
    configs = [("ceiling: decode_image over in-memory JPEGs, 1 process", None)] + [
        (f"reader, {'in-process' if n == 0 else f'{n} loader process(es)'}", n) for n in (0, 1, 2)
    ]
    rates = {name: [] for name, _ in configs}
    ratios = {name: [] for name, _ in configs}
    with tempfile.TemporaryDirectory() as tmp:
        shards = write(tmp, jpgs)
        reader(shards[:1], size, 1)  # warm the page cache and imports, start the fork server
        for _ in range(repeats):
            top = ceiling(jpgs, size)
            for name, loaders in configs:
                rate = top if loaders is None else reader(shards, size, loaders)
                rates[name].append(rate)
                ratios[name].append(rate / top / max(loaders or 1, 1))
        handover = handover_seconds(size)
        starts = start_methods(shards, size, repeats)
    rows = [
        {
            "stage": name,
            "samples_per_s": float(np.median(rates[name])),
            "ratio": float(np.median(ratios[name])),
            "ratios": ratios[name],
        }
        for name, _ in configs
    ]
    # The bound of a loader process: the trainer receives each batch, which decoding alone
    # (the ceiling) never pays. As a ratio: decode time / (decode time + hand-over time).
    decode = BATCH / rows[0]["samples_per_s"]
    rows.append(
        {
            "stage": f"bound for a loader process: hand-over {1e3 * handover:.1f} ms per batch of {BATCH}",
            "samples_per_s": BATCH / (decode + handover),
            "ratio": decode / (decode + handover),
            "ratios": [],
            "handover_ms": 1e3 * handover,
        }
    )
    return rows + starts


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--side", type=int, default=256, help="stored JPEG side (Open Images shards: short side 256)")
    parser.add_argument("--size", type=int, default=224, help="model input side")
    parser.add_argument("--repeats", type=int, default=3, help="medians over this many rounds")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    rows = run(args.images, args.side, args.size, args.repeats)
    print(f"{'stage':<58} {'samples/s':>10} {'per process vs ceiling':>24}  (each round)")
    for row in (r for r in rows if "first_batch_s" not in r):
        print(
            f"{row['stage']:<58} {row['samples_per_s']:>10.0f} {row['ratio']:>24.2f}  "
            + " ".join(f"{r:.2f}" for r in row["ratios"])
        )
    print(f"\n{'how the loader process starts':<58} {'samples/s':>10} {'vs fork':>10} {'first batch':>12}")
    for row in (r for r in rows if "first_batch_s" in r):
        print(
            f"{row['stage']:<58} {row['samples_per_s']:>10.0f} {row['ratio']:>10.2f} {row['first_batch_s']:>11.2f}s  "
            + " ".join(f"{r:.2f}" for r in row["ratios"])
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
