"""The synthetic benchmark: small coloured shapes on clutter, labels = colour x shape compositions.

It tests the paper's claim (docs/datasets.md): a holistic image feature cannot bind the attributes of
several small objects, shared attention can, and it transfers to unseen compositions.
- Each image holds 2-5 objects, each at most a sixth of the image side, on noise and line clutter.
- A label is a (colour, shape) pair present on one object. An image with a red circle and a blue
  square is positive for "red circle" and "blue square" and verified negative for "red square".
- Unseen labels are compositions that never occur in training (or validation) images, while each
  of their colours and shapes does occur, in other compositions.
- A label's vector is its colour vector next to its shape vector, plus noise: the attributes are
  shared, so a model that binds them can transfer. The noise (`embed_noise`, the noise's norm
  relative to the attribute part's) is the part of a label's vector its attributes do not
  predict, as a real word vector of "red car" is not exactly "red" + "car".
- A fraction of each image's negatives is left unannotated (unknown), as in Open Images.
Everything is a function of the seed: the vocabulary from the seed, each image from (seed, split, index).
"""

from __future__ import annotations

import math
import multiprocessing
import time
from contextlib import nullcontext

import numpy as np
from PIL import Image, ImageDraw

from datasets.contract import Label, write_metadata
from datasets.makers.shards import SplitWriter, encode_jpeg, encode_labels

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 190, 40),
    "blue": (50, 90, 240),
    "yellow": (235, 225, 40),
    "magenta": (220, 40, 220),
    "cyan": (40, 215, 225),
    "orange": (245, 140, 20),
    "white": (245, 245, 245),
}
SHAPES = ("circle", "square", "triangle", "diamond", "cross", "ring", "frame", "x")
SPLIT_IDS = {"train": 1, "val": 2, "test": 3}


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, size: float, colour) -> None:
    r = size / 2
    box = (cx - r, cy - r, cx + r, cy + r)
    width = max(2, round(size / 5))
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=colour)
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=colour)
    elif shape == "cross":
        draw.rectangle((cx - r, cy - width / 2, cx + r, cy + width / 2), fill=colour)
        draw.rectangle((cx - width / 2, cy - r, cx + width / 2, cy + r), fill=colour)
    elif shape == "ring":
        draw.ellipse(box, outline=colour, width=width)
    elif shape == "frame":
        draw.rectangle(box, outline=colour, width=width)
    elif shape == "x":
        draw.line((cx - r, cy - r, cx + r, cy + r), fill=colour, width=width)
        draw.line((cx - r, cy + r, cx + r, cy - r), fill=colour, width=width)
    else:
        raise ValueError(f"unknown shape {shape}")


class SyntheticBenchmark:
    def __init__(
        self,
        seed: int,
        image_size: int = 96,
        embed_noise: float = 0.15,
        unknown_fraction: float = 0.1,
        embed_dim: int = 32,
    ):
        self.seed, self.image_size = seed, image_size
        self.unknown_fraction = unknown_fraction
        rng = np.random.default_rng([seed, 0])
        self.colours, self.shapes = list(COLOURS), list(SHAPES)
        nc, ns = len(self.colours), len(self.shapes)
        self.compositions = [(c, s) for c in range(nc) for s in range(ns)]
        # Unseen: two "diagonals" of the colour x shape grid under random relabelling, minus one:
        # 15 compositions, at most two per colour and per shape, so every attribute stays seen.
        colour_perm, shape_perm = rng.permutation(nc), rng.permutation(ns)
        unseen = {(int(colour_perm[i]), int(shape_perm[(i + offset) % ns])) for offset in (0, 3) for i in range(nc)}
        unseen.discard((int(colour_perm[-1]), int(shape_perm[(nc - 1 + 3) % ns])))
        self.unseen = sorted(unseen)
        self.seen = [c for c in self.compositions if c not in unseen]
        half = embed_dim // 2
        colour_vecs = rng.normal(size=(nc, half))
        shape_vecs = rng.normal(size=(ns, half))
        self.embeddings = np.stack(
            [
                np.concatenate(
                    [colour_vecs[c] / np.linalg.norm(colour_vecs[c]), shape_vecs[s] / np.linalg.norm(shape_vecs[s])]
                )
                + embed_noise * rng.normal(size=2 * half) / math.sqrt(half)
                for c, s in self.compositions
            ]
        ).astype(np.float32)

    @property
    def labels(self) -> list[Label]:
        unseen = set(self.unseen)
        return [
            Label(
                i,
                f"{self.colours[c]}_{self.shapes[s]}",
                f"{self.colours[c]} {self.shapes[s]}",
                "unseen" if (c, s) in unseen else "seen",
            )
            for i, (c, s) in enumerate(self.compositions)
        ]

    def sample(self, split: str, index: int) -> tuple[np.ndarray, list[int], list[int]]:
        """One image (uint8 HxWx3) with its positive and verified-negative label indices."""
        rng = np.random.default_rng([self.seed, SPLIT_IDS[split], index])
        n = self.image_size
        # Clutter: smooth noise and a few thin low-saturation lines.
        base = rng.integers(30, 90)
        noise = rng.normal(0, 18, size=(n // 4, n // 4, 3))
        noise = np.kron(noise, np.ones((4, 4, 1))) + rng.normal(0, 10, size=(n, n, 3))
        image = Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(image)
        for _ in range(rng.integers(3, 8)):
            grey = int(rng.integers(60, 160))
            tint = rng.integers(-20, 20, size=3)
            draw.line(
                tuple(rng.uniform(0, n, size=4)), width=1, fill=tuple(int(np.clip(grey + t, 0, 255)) for t in tint)
            )
        pool = self.seen if split != "test" else self.compositions
        count = int(rng.integers(2, 6))
        chosen = [pool[i] for i in rng.choice(len(pool), size=count, replace=False)]
        max_size = n / 6
        placed: list[tuple[float, float, float]] = []
        for colour, shape in chosen:
            size = rng.uniform(0.7, 1.0) * max_size
            for _ in range(100):  # rejection-sample a spot that does not touch earlier objects
                cx, cy = rng.uniform(size / 2 + 1, n - size / 2 - 1, size=2)
                if all(math.hypot(cx - x, cy - y) > (size + s) / 2 + 2 for x, y, s in placed):
                    break
            placed.append((cx, cy, size))
            draw_shape(draw, self.shapes[shape], cx, cy, size, COLOURS[self.colours[colour]])
        index_of = {comp: i for i, comp in enumerate(self.compositions)}
        pos = sorted(index_of[c] for c in chosen)
        neg = [i for i in range(len(self.compositions)) if i not in pos and rng.random() >= self.unknown_fraction]
        return np.asarray(image), pos, neg


def _encoded_sample(job) -> tuple[str, dict[str, bytes]]:
    bench, split, index = job
    image, pos, neg = bench.sample(split, index)
    return f"{split}{index:07d}", {"jpg": encode_jpeg(image), "labels.json": encode_labels(pos, neg)}


def write_synthetic(
    out: str,
    seed: int,
    sizes: dict[str, int],
    image_size: int = 96,
    shard_size: int = 250,
    workers: int = 1,
    embed_noise: float = 0.15,
    log=print,
) -> None:
    """Write the benchmark to `out`; images are generated in `workers` processes, written in order."""
    bench = SyntheticBenchmark(seed, image_size, embed_noise=embed_noise)
    splits = {}
    with multiprocessing.get_context("fork").Pool(workers) if workers > 1 else nullcontext() as pool:
        for split, count in sizes.items():
            start = time.time()
            jobs = ((bench, split, i) for i in range(count))
            samples = pool.imap(_encoded_sample, jobs, chunksize=32) if pool else map(_encoded_sample, jobs)
            with SplitWriter(out, split, maxcount=shard_size) as writer:
                for i, (key, fields) in enumerate(samples, start=1):
                    writer.write(key, fields)
                    if i % 1000 == 0 or i == count:
                        log(f"  {split}: {i}/{count} images ({i / max(time.time() - start, 1e-9):.0f}/s)")
            splits[split] = writer.shards
    write_metadata(
        out,
        name=f"synthetic-seed{seed}",
        kind="image",
        labels=bench.labels,
        embeddings=bench.embeddings,
        splits=splits,
        extra={"image_size": image_size, "generator": "lesa synth", "seed": seed, "embed_noise": embed_noise},
    )
    log(
        f"wrote {out}: {len(bench.seen)} seen + {len(bench.unseen)} unseen labels, "
        + ", ".join(f"{s} {n} images" for s, n in sizes.items())
    )
