"""Streaming reader: WebDataset shards in, batches of decoded tensors out.

One chain of named stages, run inside each DataLoader process of each training worker:

    epoch shard list -> split by rank -> split by loader process -> read tar samples
        -> shuffle (training) -> decode -> batch

Training streams are endless (epoch after epoch, the shard order reshuffled from (seed, epoch)),
so every worker can run the same number of steps and nobody waits at an epoch's end. Evaluation
streams make one pass over a disjoint share of the shards with no padding.

Decode reads the image (`jpg`), or in a feature dataset (`lesa extract`) the cached backbone
output (`feat.npy`, float16 [regions, channels]); nothing else changes for the stages around it.

Bad input never stops the stream: a corrupt, oversized or unsupported image (datasets/images.py),
a corrupt feature array, a missing or malformed `labels.json`, a label index out of range or a
truncated shard is skipped, and a record (shard, key, kind, detail) travels with the next batch
(`Batch.skipped`) so the trainer can count and report it. A shard that breaks counts as bad
every sample dataset.json gives it that was not read (`Skip.samples`), not as one.
"""

from __future__ import annotations

import functools
import io
import itertools
import json
import os
import random
from dataclasses import dataclass, field

import fsspec
import numpy as np
import torch
from PIL import Image
from webdataset.tariterators import base_plus_ext

from datasets.batch import Batch, Skip
from datasets.contract import FeatureSpec, Shard
from datasets.images import IMAGE_FORMATS, BadSample, decode_rgb
from datasets.loader_process import fork_server, start_loader_process
from datasets.position import DataPosition
from datasets.tar import TruncatedMember, iter_tar

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png")
RESAMPLING = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}  # a backbone's resize filter
FEATURE_EXTENSION = "feat.npy"  # feature shards (`lesa extract`): float16 [regions, channels]
TRUNCATED_SHARD = "unreadable or truncated shard"


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
    position: DataPosition | None = None  # training resumed: samples already used are skipped
    features: FeatureSpec | None = None  # a feature dataset: decode feat.npy instead of the image
    resample: str = "bilinear"  # a key of RESAMPLING: the backbone's own (clip: bicubic, as CLIP's preprocessing)


@dataclass
class Pending:
    """What the read and decode stages owe the next batch: skip records and used positions of
    samples that are not in a batch (bad, or past a truncation)."""

    skipped: list = field(default_factory=list)
    used: list = field(default_factory=list)

    def drain(self) -> tuple[list, list]:
        out = (self.skipped, self.used)
        self.skipped, self.used = [], []
        return out


# --- stage: shard lists ------------------------------------------------------------------------


def epoch_order(spec: StreamSpec, epoch: int) -> list[int]:
    """Shard indices in this epoch's order: shuffled from (seed, epoch) alone for training (not
    from the number of workers, so a resumed run agrees), as listed for evaluation."""
    order = list(range(len(spec.shards)))
    if spec.train:
        random.Random(spec.seed * 1_000_003 + epoch).shuffle(order)
    return order


def epoch_shards(spec: StreamSpec, epoch: int) -> list[Shard]:
    return [spec.shards[i] for i in epoch_order(spec, epoch)]


def unfinished(order: list[int], epoch: int, position: DataPosition | None) -> list[int]:
    """The shards of a resumed epoch that still hold unused samples (all shards otherwise)."""
    if position is None:
        return order
    return [i for i in order if (mask := position.unused(epoch, i)) is None or mask.any()]


def split_by_rank(items: list, rank: int, world: int) -> list:
    return items[rank::world]


def split_by_loader(items: list) -> list:
    info = torch.utils.data.get_worker_info()
    return items if info is None else items[info.id :: info.num_workers]


# --- stage: read ---------------------------------------------------------------------------------


def read_samples(shards: list[tuple[int, Shard]], epoch: int, pending: Pending, position: DataPosition | None = None):
    """Yield {__key__, __shard__, __pos__, ext: bytes} per sample, grouping a tar's members by key
    as WebDataset does; `__pos__` is (epoch, shard index, sample index). Samples `position` marks
    used are read past, not yielded. A shard that cannot be read to its end, or that ends before
    the sample count dataset.json gives (a cut at a member boundary looks like a clean end to
    tarfile), is recorded with the key of the sample it stopped in, and its unread samples count
    as used."""
    for index, shard in shards:
        unused = position.unused(epoch, index) if position is not None else None
        current, count = None, 0

        def finished(sample, unused=unused):
            nonlocal count
            count += 1
            if unused is None or unused[count - 1]:
                return sample
            return None

        try:
            with fsspec.open(shard.url, "rb") as stream:
                for name, data in iter_tar(stream):
                    key, ext = base_plus_ext(name)
                    if key is None:
                        continue
                    if current is not None and current["__key__"] != key:
                        if (sample := finished(current)) is not None:
                            yield sample
                        current = None
                    if current is None:
                        if count >= shard.samples:
                            raise ValueError(f"more samples than the {shard.samples} dataset.json lists")
                        current = {"__key__": key, "__shard__": shard.url, "__pos__": (epoch, index, count)}
                    current[ext.lower()] = data
            if current is not None and (sample := finished(current)) is not None:
                yield sample
            current = None
            if count < shard.samples:
                raise EOFError(f"ended after {count} of the {shard.samples} samples dataset.json lists")
        except Exception as exc:  # noqa: BLE001 - any read failure of one shard is recorded, not fatal
            cut_key = base_plus_ext(exc.name)[0] if isinstance(exc, TruncatedMember) else None
            if current is not None and cut_key is not None and cut_key != current["__key__"]:
                if (sample := finished(current)) is not None:  # the cut is in the next sample
                    yield sample
                current = None
            where = cut_key or (current["__key__"] if current else "-")
            unread = [(epoch, index, i) for i in range(count, shard.samples) if unused is None or unused[i]]
            detail = f"{type(exc).__name__}: {exc}; {len(unread)} of its {shard.samples} samples unread, counted bad"
            pending.skipped.append(Skip(shard.url, where, TRUNCATED_SHARD, detail, samples=max(1, len(unread))))
            pending.used += unread


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


def decode_image(
    data: bytes, size: int, formats: tuple[str, ...] = IMAGE_FORMATS, resample: str = "bilinear"
) -> np.ndarray:
    """RGB uint8 [size, size, 3]: the picture upright and in 8 bits (`decode_rgb`), its short side
    resized to `size` with the `resample` filter, then a centre crop. Only `formats` are decoded (a
    shard's are those of datasets/images.py), and only up to its pixel limit."""
    image = decode_rgb(data, formats)
    w, h = image.size
    if (w, h) != (size, size):
        scale = size / min(w, h)
        image = image.resize((max(size, round(w * scale)), max(size, round(h * scale))), RESAMPLING[resample])
        w, h = image.size
        left, top = (w - size) // 2, (h - size) // 2
        image = image.crop((left, top, left + size, top + size))
    return np.asarray(image, dtype=np.uint8)


def decode_feature(data: bytes, shape: tuple[int, int]) -> np.ndarray:
    """float16 [regions, channels] from a `feat.npy` field, loaded without unpickling."""
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as exc:  # noqa: BLE001 - numpy raises several types for a damaged .npy
        raise BadSample("corrupt feature", f"{type(exc).__name__}: {exc}") from None
    if array.dtype.kind != "f":
        raise BadSample("corrupt feature", f"dtype {array.dtype}, expected float16")
    if array.shape != tuple(shape):
        raise BadSample(
            "feature shape mismatch", f"{list(array.shape)}, expected {list(shape)} as dataset.json's features say"
        )
    if not np.isfinite(array).all():
        raise BadSample("corrupt feature", "non-finite values")
    return array.astype(np.float16, copy=False)


def decode_input(sample: dict, spec: StreamSpec) -> np.ndarray:
    """The model's input of one sample: its feature rows in a feature dataset, else its image."""
    if spec.features is not None:
        if FEATURE_EXTENSION not in sample:
            raise BadSample("missing feature", f"no {FEATURE_EXTENSION} field")
        return decode_feature(sample[FEATURE_EXTENSION], spec.features.shape)
    ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
    if ext is None:
        raise BadSample("missing image", f"no field of {', '.join(IMAGE_EXTENSIONS)}")
    return decode_image(sample[ext], spec.image_size, resample=spec.resample)


def decode_labels(data: bytes, num_labels: int) -> np.ndarray:
    """+1 present / -1 absent / 0 unknown, as int8 [num_labels]."""
    try:
        record = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadSample("malformed labels.json", str(exc)) from None
    if (
        not isinstance(record, dict)
        or not isinstance(record.get("pos"), list)
        or not isinstance(record.get("neg", []), list)
    ):
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


def decode(samples, spec: StreamSpec, pending: Pending):
    for sample in samples:
        key, shard = sample["__key__"], sample["__shard__"]
        try:
            if "labels.json" not in sample:
                raise BadSample("missing labels.json")
            yield {
                "key": key,
                "pos": sample["__pos__"],
                "image": decode_input(sample, spec),
                "labels": decode_labels(sample["labels.json"], spec.num_labels),
            }
        except BadSample as exc:
            pending.skipped.append((shard, key, exc.kind, exc.detail))
            pending.used.append(sample["__pos__"])


SKIP_REPORT_EVERY = 256


def skip_report(pending: Pending) -> Batch:
    """A batch with no samples that only carries skip records and their positions."""
    skipped, used = pending.drain()
    return Batch(None, None, [], [], used, skipped)


# --- stage: batch --------------------------------------------------------------------------------


def batched(samples, batch_size: int, pending: Pending, keep_partial: bool):
    """Batches of decoded samples; each carries the positions it uses (its samples' and those of
    the bad samples skipped since the last batch), so the trainer can mark them used. `images` is
    the model's input: uint8 [B, H, W, 3] images, or float16 [B, R, C] rows of a feature dataset."""

    def collate(items) -> Batch:
        skipped, used = pending.drain()
        return Batch(
            images=torch.from_numpy(np.stack([s["image"] for s in items])),
            labels=torch.from_numpy(np.stack([s["labels"] for s in items])),
            keys=[s["key"] for s in items],
            epochs=[s["pos"][0] for s in items],
            positions=[s["pos"] for s in items] + used,
            skipped=skipped,
        )

    items = []
    for sample in samples:
        items.append(sample)
        if len(items) == batch_size:
            yield collate(items)
            items = []
        elif len(pending.skipped) >= SKIP_REPORT_EVERY:  # a stream of only bad samples still reports
            yield skip_report(pending)
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

    def epoch(self, epoch: int, pending: Pending):
        """One pass over this loader process's shards: read, shuffle (training), decode."""
        spec = self.spec
        order = unfinished(epoch_order(spec, epoch), epoch, spec.position)
        mine = split_by_loader(split_by_rank(order, spec.rank, spec.world))
        samples = read_samples([(i, spec.shards[i]) for i in mine], epoch, pending, spec.position)
        if spec.train:
            info = torch.utils.data.get_worker_info()
            loader_id = 0 if info is None else info.id
            samples = shuffle(
                samples, spec.shuffle_buffer, random.Random(hash((spec.seed, epoch, spec.rank, loader_id)))
            )
        return decode(samples, spec, pending)

    def samples(self, pending: Pending):
        position = self.spec.position
        first = position.completed_epochs if position is not None else 0
        for epoch in itertools.count(first) if self.spec.train else [0]:
            good = [0]
            yield from counted(self.epoch(epoch, pending), good)
            resumed = position is not None and epoch in position.used
            if good[0] == 0 and not resumed:  # a whole pass with nothing usable would spin forever
                return

    def __iter__(self):
        pending = Pending()
        yield from batched(self.samples(pending), self.spec.batch_size, pending, keep_partial=not self.spec.train)
        if pending.skipped or pending.used:  # bad samples after the last batch still get reported
            yield skip_report(pending)


def make_loader(spec: StreamSpec, loader_workers: int, pin_memory: bool = False):
    return torch.utils.data.DataLoader(
        ShardStream(spec),
        batch_size=None,
        num_workers=loader_workers,
        pin_memory=pin_memory,
        persistent_workers=False,
        multiprocessing_context=fork_server() if loader_workers else None,
        worker_init_fn=functools.partial(start_loader_process, dict(os.environ), os.getpid())
        if loader_workers
        else None,
    )
