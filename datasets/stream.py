"""Streaming reader: WebDataset shards in, batches of decoded tensors out.

One chain of named stages, run inside each DataLoader process of each training worker:

    epoch shard list -> split by rank -> split by loader process -> read tar samples
        -> shuffle (training) -> decode -> batch

Training streams are endless (epoch after epoch, the shard order reshuffled from (seed, epoch)),
so every worker can run the same number of steps and nobody waits at an epoch's end. Evaluation
streams make one pass over a disjoint share of the shards with no padding.

Bad input never stops the stream: a corrupt image, a missing or malformed `labels.json`, a label
index out of range or a truncated shard is skipped, and a record (shard, key, kind, detail)
travels with the next batch (`batch["skipped"]`) so the trainer can count and report it.
"""

from __future__ import annotations

import io
import itertools
import json
import random
import tarfile
from dataclasses import dataclass

import fsspec
import numpy as np
import torch
from PIL import Image
from webdataset.tariterators import base_plus_ext

from datasets.contract import Shard

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png")
TRUNCATED_SHARD = "unreadable or truncated shard"


class BadSample(ValueError):
    """A sample that cannot be used: `kind` is the category counted, `detail` the specifics."""

    def __init__(self, kind: str, detail: str = ""):
        super().__init__(f"{kind}: {detail}" if detail else kind)
        self.kind, self.detail = kind, detail


@dataclass
class StreamSpec:
    shards: list[Shard]
    num_labels: int
    image_size: int
    batch_size: int
    rank: int = 0
    world: int = 1
    seed: int = 0
    train: bool = True
    shuffle_buffer: int = 1000


# --- stage: shard lists ------------------------------------------------------------------------

def epoch_shards(spec: StreamSpec, epoch: int) -> list[Shard]:
    """All shards in this epoch's order: shuffled from (seed, epoch) for training, as listed otherwise."""
    shards = list(spec.shards)
    if spec.train:
        random.Random(spec.seed * 1_000_003 + epoch).shuffle(shards)
    return shards


def split_by_rank(shards: list[Shard], rank: int, world: int) -> list[Shard]:
    return shards[rank::world]


def split_by_loader(shards: list[Shard]) -> list[Shard]:
    info = torch.utils.data.get_worker_info()
    return shards if info is None else shards[info.id::info.num_workers]


# --- stage: read ---------------------------------------------------------------------------------

def read_samples(shards: list[Shard], skipped: list):
    """Yield {__key__, __shard__, ext: bytes} per sample, grouping a tar's members by key as
    WebDataset does. A shard that cannot be read to its end, or that ends before the sample count
    dataset.json gives (a cut at a member boundary looks like a clean end to tarfile), is recorded
    with the key of the sample it stopped in."""
    for shard in shards:
        current, count = None, 0
        try:
            with fsspec.open(shard.url, "rb") as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
                for member in tar:
                    key, ext = base_plus_ext(member.name) if member.isreg() else (None, None)
                    if key is None:
                        continue
                    if current is not None and current["__key__"] != key:
                        yield current
                        current, count = None, count + 1
                    if current is None:
                        current = {"__key__": key, "__shard__": shard.url}
                    current[ext.lower()] = tar.extractfile(member).read()
                    tar.members = []  # stream mode would otherwise keep every header in memory
            if current is not None:
                yield current
                current, count = None, count + 1
        except Exception as exc:  # noqa: BLE001 - any read failure of one shard is recorded, not fatal
            where = current["__key__"] if current else "-"
            skipped.append((shard.url, where, TRUNCATED_SHARD, f"{type(exc).__name__}: {exc}"))
            continue
        if count < shard.samples:
            skipped.append((shard.url, "-", TRUNCATED_SHARD,
                            f"ended after {count} of the {shard.samples} samples dataset.json lists"))


# --- stage: shuffle ------------------------------------------------------------------------------

def shuffle(samples, buffer_size: int, rng: random.Random):
    buffer = []
    for sample in samples:
        buffer.append(sample)
        if len(buffer) >= buffer_size:
            i = rng.randrange(len(buffer))
            buffer[i], buffer[-1] = buffer[-1], buffer[i]
            yield buffer.pop()
    rng.shuffle(buffer)
    yield from buffer


# --- stage: decode (explicit per extension; nothing is unpickled) ---------------------------------

def decode_image(data: bytes, size: int) -> np.ndarray:
    """RGB uint8 [size, size, 3]: the short side resized to `size`, then a centre crop."""
    try:
        image = Image.open(io.BytesIO(data))
        image = image.convert("RGB")
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for corrupt data
        raise BadSample("corrupt image", f"{type(exc).__name__}: {exc}") from None
    w, h = image.size
    if (w, h) != (size, size):
        scale = size / min(w, h)
        image = image.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BILINEAR)
        w, h = image.size
        left, top = (w - size) // 2, (h - size) // 2
        image = image.crop((left, top, left + size, top + size))
    return np.asarray(image, dtype=np.uint8)


def decode_labels(data: bytes, num_labels: int) -> np.ndarray:
    """+1 present / -1 absent / 0 unknown, as int8 [num_labels]."""
    try:
        record = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadSample("malformed labels.json", str(exc)) from None
    if not isinstance(record, dict) or not isinstance(record.get("pos"), list) \
            or not isinstance(record.get("neg", []), list):
        raise BadSample("malformed labels.json", 'expected {"pos": [...], "neg": [...]}')
    pos, neg = record["pos"], record.get("neg", [])
    for index in itertools.chain(pos, neg):
        if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < num_labels:
            raise BadSample("label index out of range", f"{index!r} not in [0, {num_labels})")
    if set(pos) & set(neg):
        raise BadSample("label both pos and neg", str(sorted(set(pos) & set(neg))))
    labels = np.zeros(num_labels, dtype=np.int8)
    labels[neg] = -1
    labels[pos] = 1
    return labels


def decode(samples, spec: StreamSpec, skipped: list):
    for sample in samples:
        key, shard = sample["__key__"], sample["__shard__"]
        try:
            if "labels.json" not in sample:
                raise BadSample("missing labels.json")
            ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
            if ext is None:
                raise BadSample("missing image", f"no field of {', '.join(IMAGE_EXTENSIONS)}")
            yield {"key": key,
                   "image": decode_image(sample[ext], spec.image_size),
                   "labels": decode_labels(sample["labels.json"], spec.num_labels)}
        except BadSample as exc:
            skipped.append((shard, key, exc.kind, exc.detail))


SKIP_REPORT_EVERY = 256


def skip_report(skipped: list) -> dict:
    """A batch with no samples that only carries skip records."""
    report = {"images": None, "labels": None, "keys": [], "skipped": list(skipped)}
    skipped.clear()
    return report


# --- stage: batch --------------------------------------------------------------------------------

def batched(samples, batch_size: int, skipped: list, keep_partial: bool):
    def collate(items):
        batch = {"images": torch.from_numpy(np.stack([s["image"] for s in items])),
                 "labels": torch.from_numpy(np.stack([s["labels"] for s in items])),
                 "keys": [s["key"] for s in items],
                 "skipped": list(skipped)}
        skipped.clear()
        return batch

    items = []
    for sample in samples:
        items.append(sample)
        if len(items) == batch_size:
            yield collate(items)
            items = []
        elif len(skipped) >= SKIP_REPORT_EVERY:  # a stream of only bad samples still reports
            yield skip_report(skipped)
    if items and keep_partial:
        yield collate(items)


def counted(samples, counter: list):
    for sample in samples:
        counter[0] += 1
        yield sample


class ShardStream(torch.utils.data.IterableDataset):
    """The pipeline above as an IterableDataset; wrap it in a DataLoader with batch_size=None."""

    def __init__(self, spec: StreamSpec):
        self.spec = spec

    def epoch(self, epoch: int, skipped: list):
        """One pass over this loader process's shards: read, shuffle (training), decode."""
        spec = self.spec
        shards = split_by_loader(split_by_rank(epoch_shards(spec, epoch), spec.rank, spec.world))
        samples = read_samples(shards, skipped)
        if spec.train:
            info = torch.utils.data.get_worker_info()
            loader_id = 0 if info is None else info.id
            samples = shuffle(samples, spec.shuffle_buffer, random.Random(hash((spec.seed, epoch, spec.rank, loader_id))))
        return decode(samples, spec, skipped)

    def samples(self, skipped: list):
        for epoch in itertools.count() if self.spec.train else [0]:
            good = [0]
            yield from counted(self.epoch(epoch, skipped), good)
            if good[0] == 0:  # a whole pass with nothing usable: an endless stream would spin forever
                return

    def __iter__(self):
        skipped: list = []
        yield from batched(self.samples(skipped), self.spec.batch_size, skipped, keep_partial=not self.spec.train)
        if skipped:  # bad samples after the last batch still get reported
            yield skip_report(skipped)


def make_loader(spec: StreamSpec, loader_workers: int, pin_memory: bool = False):
    return torch.utils.data.DataLoader(ShardStream(spec), batch_size=None, num_workers=loader_workers,
                                       pin_memory=pin_memory, persistent_workers=False)
