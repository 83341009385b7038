"""The feature cache: a frozen backbone's output for every image, as a dataset of kind "feature".

LESA never fine-tunes its VGG-19 (docs/protocol.md, Backbone): running it on every image in every epoch
repeats the same work, so the official code extracts conv5_4 once and trains the head on that.
Here `lesa extract` (launch/extract.py) deals the image shards out to Ray actors; each actor holds
the backbone on its device and turns one image shard into one feature shard at the same relative
path, with the same keys in the same order and the same labels:

    image shard -> the streaming reader (read, decode, batch; bad samples skipped and recorded)
        -> backbone -> float16 rows [regions, channels] -> `feat.npy` + `labels.json`

A feature root holds the dataset contract (dataset.json with kind "feature" and how the features
were made, labels.tsv, embeddings.npy, the shards) plus `extract/`: one JSON record per finished
shard (samples written, samples skipped and why). A shard is done once its record exists; the
record is written after the shard is closed, so a rerun redoes exactly the shards that a crash
or a stop left unfinished.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Callable

import fsspec
import numpy as np
import torch

from datasets.batch import skipped_samples
from datasets.contract import FeatureSpec, Shard, join
from datasets.makers.shards import ShardFile, encode_labels, encode_npy
from datasets.stream import FEATURE_EXTENSION, StreamSpec, make_loader

RECORDS_DIR = "extract"
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
FLOAT16_MAX = float(np.finfo(np.float16).max)


def relative_path(root: str, shard: Shard) -> str:
    """The shard's path inside its dataset root (read_dataset made its URL as root/path)."""
    return shard.url[len(root.rstrip("/")) + 1 :]


def record_url(out: str, relpath: str) -> str:
    return join(out, RECORDS_DIR, relpath + ".json")


def read_record(url: str) -> dict | None:
    """A finished shard's record, or None when the shard still has to be extracted."""
    try:
        with fsspec.open(url, "r") as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def write_json(url: str, value: dict) -> None:
    fs, path = fsspec.core.url_to_fs(url)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    with fsspec.open(url, "w") as f:
        json.dump(value, f, indent=1)


def same_source(spec: dict, backbone: str, weights: str | None, image_size: int) -> bool:
    """Whether a record's features were made the way the config asks now."""
    return (spec.get("backbone"), spec.get("weights"), spec.get("image_size")) == (backbone, weights, image_size)


def feature_rows(fmap: torch.Tensor) -> np.ndarray:
    """[B, C, h, w] -> float32 [B, h * w, C], regions row-major (r = row * w + col) as LESA stores them."""
    return fmap.float().flatten(2).transpose(1, 2).cpu().numpy()


@dataclass(frozen=True)
class ExtractSettings:
    """What an extraction actor needs of the run's config (launch/extract.py fills it in)."""

    backbone: str  # model.backbone, recorded with the features
    weights: str | None  # model.backbone_weights, recorded with the features
    image_size: int  # data.image_size
    batch_size: int  # eval.batch_size
    loader_workers: int  # data.loader_workers (at most 1 is used: one shard at a time)
    use_gpu: bool  # scaling.use_gpu
    cpus_per_worker: int  # scaling.cpus_per_worker: torch threads on a CPU actor
    compile: bool = False  # model.compile
    precision: str = "fp32"  # a key of PRECISIONS: the backbone's autocast
    resample: str = "bilinear"  # the backbone's resize filter (datasets/stream.py, RESAMPLING)


class ShardExtractor:
    """The work of one Ray actor: a frozen backbone (`make_backbone()`, built once on this actor)
    on this actor's device, applied to one image shard per `extract` call."""

    def __init__(self, make_backbone: Callable[[], torch.nn.Module], settings: ExtractSettings):
        self.settings, self.autocast_dtype = settings, PRECISIONS[settings.precision]
        if settings.use_gpu:
            self.device = torch.device("cuda", torch.cuda.current_device())
        else:
            self.device = torch.device("cpu")
            torch.set_num_threads(settings.cpus_per_worker)
        self.backbone = make_backbone().to(self.device).eval()
        if self.device.type == "cuda":
            self.backbone = self.backbone.to(memory_format=torch.channels_last)
        size = settings.image_size
        probe = self.features(torch.zeros(1, size, size, 3, dtype=torch.uint8))
        self.spec = FeatureSpec(
            backbone=settings.backbone,
            weights=settings.weights,
            image_size=size,
            grid=(probe.shape[2], probe.shape[3]),
            channels=probe.shape[1],
        )
        if settings.compile:  # after the probe: its batch of 1 would be one more shape to compile
            self.backbone.compile()

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.device, non_blocking=True)
        with torch.autocast(
            self.device.type, dtype=self.autocast_dtype or torch.float32, enabled=self.autocast_dtype is not None
        ):
            return self.backbone(images)

    def made_with(self) -> dict:
        return self.spec.to_json()

    def extract(self, job: dict) -> dict:
        """Image shard `job["source"]` -> feature shard `job["out"]`, then its record: what was
        written, and every sample skipped with its key, kind and detail."""
        settings, start = self.settings, time.time()
        stream = StreamSpec(
            shards=[Shard(job["source"], job["samples"])],
            num_labels=job["num_labels"],
            image_size=settings.image_size,
            batch_size=settings.batch_size,
            train=False,
            resample=settings.resample,
        )
        loader = make_loader(stream, min(settings.loader_workers, 1), pin_memory=self.device.type == "cuda")
        skipped, read = [], 0
        with ShardFile(job["out"]) as shard:
            for batch in loader:
                # A broken shard is one skip record standing for all its unread samples.
                read += len(batch.keys) + sum(map(skipped_samples, batch.skipped))
                skipped += [{"key": key, "kind": kind, "detail": detail} for _, key, kind, detail in batch.skipped]
                if not batch.has_samples:
                    continue
                rows = feature_rows(self.features(batch.images))
                if np.abs(rows).max() > FLOAT16_MAX or not np.isfinite(rows).all():
                    # Not a bad image but wrong weights or inputs: every later shard would fail too.
                    raise ValueError(
                        f"{job['source']}: features of keys {batch['keys'][:3]}... are not finite "
                        f"or exceed float16's range; check model.backbone_weights"
                    )
                rows = rows.astype(np.float16)
                for key, x, y in zip(batch.keys, rows, batch.labels.numpy()):
                    shard.write(
                        key,
                        {
                            FEATURE_EXTENSION: encode_npy(np.ascontiguousarray(x)),
                            "labels.json": encode_labels(np.flatnonzero(y == 1), np.flatnonzero(y == -1)),
                        },
                    )
            written = shard.samples
        record = {
            "source": job["source"],
            "shard": job["relpath"],
            "split": job["split"],
            "samples": written,
            "read": read,
            "skipped": skipped,
            "made_with": self.made_with(),
            "seconds": round(time.time() - start, 3),
        }
        write_json(job["record"], record)
        return record
