"""Benchmark: the streaming reader against its ceiling, decoding the same JPEGs in a tight loop.

    .venv/bin/python benchmarks/loader.py [--images 3000] [--side 256] [--size 224]

Both sides use the same decoder (datasets/stream.py's decode_image: PIL decode, short side
resized, centre crop). The ceiling holds the JPEG bytes in memory and decodes them one after
another; the reader streams the same images from tar shards on disk through every stage (shard
list, tar read, shuffle buffer, label decode, batching), in-process and in 1 and 2 DataLoader
processes. Reported: samples/s and the ratio to the ceiling, per loader process.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from datasets.contract import Shard  # noqa: E402
from datasets.shards import SplitWriter, encode_jpeg, encode_labels  # noqa: E402
from datasets.stream import StreamSpec, decode_image, make_loader  # noqa: E402

NUM_LABELS = 7586


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
    spec = StreamSpec(shards=shards, num_labels=NUM_LABELS, image_size=size, batch_size=32, train=False)
    start, count = time.perf_counter(), 0
    for _ in range(passes):
        for batch in make_loader(spec, loaders):
            count += len(batch["keys"])
    return count / (time.perf_counter() - start)


def run(images: int, side: int, size: int) -> list[dict]:
    jpgs = make_images(images, side)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        shards = write(tmp, jpgs)
        reader(shards[:1], size, 0)  # warm the page cache and imports
        top = ceiling(jpgs, size)
        rows.append({"stage": "ceiling: decode_image over in-memory JPEGs, 1 process", "samples_per_s": top,
                     "ratio": 1.0})
        for loaders in (0, 1, 2):
            rate = reader(shards, size, loaders)
            processes = max(loaders, 1)
            rows.append({"stage": f"reader, {'in-process' if loaders == 0 else f'{loaders} loader process(es)'}",
                         "samples_per_s": rate, "ratio": rate / top / processes})
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--side", type=int, default=256, help="stored JPEG side (Open Images shards: short side 256)")
    parser.add_argument("--size", type=int, default=224, help="model input side")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    rows = run(args.images, args.side, args.size)
    print(f"{'stage':<58} {'samples/s':>10} {'per process vs ceiling':>24}")
    for row in rows:
        print(f"{row['stage']:<58} {row['samples_per_s']:>10.0f} {row['ratio']:>24.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
