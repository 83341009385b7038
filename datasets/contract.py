"""The dataset contract of docs/dataset-format.md: what a dataset root holds and how to read its metadata.

A root (any fsspec URL or path) holds `dataset.json`, `labels.tsv`, `embeddings.npy` and one folder
of WebDataset shards per split. Converters write it with `DatasetWriter`; the trainer reads it with
`read_dataset`. Nothing here unpickles: JSON, TSV and `.npy` with `allow_pickle=False` only.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field

import fsspec
import numpy as np

ROLES = ("seen", "unseen")


class DatasetError(ValueError):
    """A dataset root does not follow the contract; the message names the file."""


@dataclass(frozen=True)
class Label:
    index: int
    id: str
    name: str
    role: str


@dataclass(frozen=True)
class Shard:
    url: str  # absolute URL of the tar file
    samples: int


KINDS = ("image", "feature")


@dataclass(frozen=True)
class FeatureSpec:
    """How a feature dataset (`kind: "feature"`) was made: every sample's `feat.npy` is the frozen
    `backbone` applied to its image at `image_size`, stored float16 as [regions, channels] with
    regions row-major over the `grid` (r = row * width + col), as LESA's extractor stores them."""

    backbone: str
    weights: str | None
    image_size: int
    grid: tuple[int, int]  # (height, width) of the feature map
    channels: int

    @property
    def shape(self) -> tuple[int, int]:
        return (self.grid[0] * self.grid[1], self.channels)

    def to_json(self) -> dict:
        return {
            "backbone": self.backbone,
            "weights": self.weights,
            "image_size": self.image_size,
            "grid": list(self.grid),
            "channels": self.channels,
            "shape": list(self.shape),
            "dtype": "float16",
        }

    @classmethod
    def from_json(cls, entry: dict, where: str) -> "FeatureSpec":
        try:
            return cls(
                backbone=str(entry["backbone"]),
                weights=entry.get("weights"),
                image_size=int(entry["image_size"]),
                grid=(int(entry["grid"][0]), int(entry["grid"][1])),
                channels=int(entry["channels"]),
            )
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise DatasetError(
                f"{where}: a feature dataset needs features: {{backbone, image_size, grid: [h, w], channels}} ({exc!r})"
            ) from None


@dataclass
class DatasetInfo:
    root: str
    name: str
    kind: str  # "image" or "feature"
    labels: list[Label]
    embeddings: np.ndarray  # float32 [num_labels, dim], raw (the model normalises)
    splits: dict[str, list[Shard]] = field(default_factory=dict)
    features: FeatureSpec | None = None  # how the features were made, for kind "feature"

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    def indices(self, role: str) -> np.ndarray:
        return np.array([lab.index for lab in self.labels if lab.role == role], dtype=np.int64)

    @property
    def seen(self) -> np.ndarray:
        return self.indices("seen")

    @property
    def unseen(self) -> np.ndarray:
        return self.indices("unseen")

    def shards(self, split: str) -> list[Shard]:
        if split not in self.splits:
            raise DatasetError(
                f"{self.root}/dataset.json: no split '{split}' (has: {', '.join(self.splits) or 'none'})"
            )
        return self.splits[split]


def join(root: str, *parts: str) -> str:
    return "/".join([root.rstrip("/"), *parts])


def read_bytes(url: str, hint: str = "is data.url the dataset root?") -> bytes:
    """The whole file; a missing one is a DatasetError naming it, with `hint` on where to look."""
    try:
        with fsspec.open(url, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise DatasetError(f"{url}: missing ({hint})") from None


def read_npy(url: str) -> np.ndarray:
    """A plain `.npy` array from any fsspec URL; never unpickled; errors name the file."""
    try:
        with fsspec.open(url, "rb") as f:
            return np.load(io.BytesIO(f.read()), allow_pickle=False)
    except FileNotFoundError:
        raise DatasetError(f"{url}: not found") from None
    except ValueError as exc:
        raise DatasetError(f"{url}: not a plain .npy array ({exc})") from None


def check_label_vectors(vectors: np.ndarray, names: list[str], where: str, fix: str) -> None:
    """Label vectors are numbers, finite and not all zero: a NaN row turns every score it touches
    into NaN, and a zero row scores 0 on every image (its label's AP is meaningless), so both are
    refused where vectors enter (conversion, write_metadata, read_dataset) with the rows named."""
    if vectors.dtype.kind not in "fiu":
        raise DatasetError(f"{where}: dtype {vectors.dtype}, expected numbers; {fix}")
    finite = np.isfinite(vectors).all(axis=1)
    for ok, what in ((finite, "NaN or Inf values"), (~finite | vectors.any(axis=1), "only zeros")):
        if not ok.all():
            rows = np.flatnonzero(~ok)
            shown = ", ".join(f"row {i} {names[i]!r}" for i in rows[:5]) + (" ..." if len(rows) > 5 else "")
            raise DatasetError(f"{where}: {len(rows)} label vector(s) with {what}: {shown}; {fix}")


def check_roles(labels: list[Label], where: str) -> None:
    """Training needs a seen label and zero-shot evaluation an unseen one."""
    seen = sum(lab.role == "seen" for lab in labels)
    if not seen or seen == len(labels):
        raise DatasetError(
            f"{where}: {seen} seen and {len(labels) - seen} unseen labels in labels.tsv; a dataset needs "
            f"at least one of each (mark the labels held out for zero-shot evaluation 'unseen')"
        )


def _read_labels(labels_url: str) -> list[Label]:
    labels = []
    lines = read_bytes(labels_url).decode("utf-8").splitlines()
    if not lines or lines[0].split("\t") != ["index", "id", "name", "role"]:
        raise DatasetError(f"{labels_url}: first line must be the header 'index<TAB>id<TAB>name<TAB>role'")
    for lineno, line in enumerate(lines[1:], start=2):
        cols = line.split("\t")
        if len(cols) != 4 or not cols[0].isdigit() or cols[3] not in ROLES:
            raise DatasetError(f"{labels_url}:{lineno}: expected 'index, id, name, seen|unseen', got {line!r}")
        if int(cols[0]) != len(labels):
            raise DatasetError(f"{labels_url}:{lineno}: index {cols[0]} out of order (expected {len(labels)})")
        labels.append(Label(int(cols[0]), cols[1], cols[2], cols[3]))
    return labels


def _read_embeddings(emb_url: str, labels: list[Label]) -> np.ndarray:
    try:
        embeddings = np.load(io.BytesIO(read_bytes(emb_url)), allow_pickle=False)
    except ValueError as exc:
        raise DatasetError(f"{emb_url}: not a plain .npy array ({exc})") from None
    if embeddings.ndim != 2 or embeddings.shape[0] != len(labels):
        raise DatasetError(f"{emb_url}: shape {embeddings.shape}, expected [{len(labels)}, dim] to match labels.tsv")
    fix = (
        "convert the dataset again with vectors for these labels "
        "(lesa convert --missing random gives a label without a known word a random one)"
    )
    check_label_vectors(embeddings, [lab.name for lab in labels], emb_url, fix)
    return embeddings.astype(np.float32)


def _read_splits(root: str, meta_url: str, meta: dict) -> dict[str, list[Shard]]:
    """Each split's shards; a shard listed twice would be read twice (a 100-image split scored as 200)."""
    splits = {}
    for split, entry in meta.get("splits", {}).items():
        try:
            splits[split] = [Shard(join(root, s["path"]), int(s["samples"])) for s in entry["shards"]]
        except (KeyError, TypeError) as exc:
            raise DatasetError(f"{meta_url}: split '{split}' needs shards: [{{path, samples}}] ({exc!r})") from None
        listed: set[str] = set()
        for shard in splits[split]:
            if shard.url in listed:
                raise DatasetError(f"{meta_url}: split '{split}' lists shard {shard.url} twice; list each shard once")
            listed.add(shard.url)
    return splits


def read_dataset(root: str) -> DatasetInfo:
    """Read and cross-check a dataset root's metadata; every inconsistency names its file."""
    meta_url = join(root, "dataset.json")
    try:
        meta = json.loads(read_bytes(meta_url))
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{meta_url}: not valid JSON ({exc})") from None
    labels = _read_labels(join(root, "labels.tsv"))
    check_roles(labels, meta_url)
    embeddings = _read_embeddings(join(root, "embeddings.npy"), labels)
    splits = _read_splits(root, meta_url, meta)
    kind = meta.get("kind", "image")
    if kind not in KINDS:
        raise DatasetError(f"{meta_url}: kind {kind!r}, expected one of {', '.join(KINDS)}")
    features = FeatureSpec.from_json(meta.get("features") or {}, meta_url) if kind == "feature" else None
    return DatasetInfo(
        root=root,
        name=meta.get("name", root),
        kind=kind,
        labels=labels,
        embeddings=embeddings,
        splits=splits,
        features=features,
    )


def write_metadata(
    root: str,
    name: str,
    kind: str,
    labels: list[Label],
    embeddings: np.ndarray,
    splits: dict[str, list[tuple[str, int]]],
    extra: dict | None = None,
) -> None:
    """Write dataset.json, labels.tsv and embeddings.npy. `splits` maps split -> [(relpath, samples)].
    Nothing is written that read_dataset would refuse: bad label vectors or roles are an error."""
    check_roles(labels, join(root, "dataset.json"))
    embeddings = np.asarray(embeddings)
    fix = "nothing was written; give these labels finite, non-zero vectors"
    check_label_vectors(embeddings, [lab.name for lab in labels], join(root, "embeddings.npy"), fix)
    fs, path = fsspec.core.url_to_fs(root)
    fs.makedirs(path, exist_ok=True)
    meta = {
        "name": name,
        "kind": kind,
        "num_labels": len(labels),
        "num_seen": sum(lab.role == "seen" for lab in labels),
        "num_unseen": sum(lab.role == "unseen" for lab in labels),
        "embedding_dim": int(embeddings.shape[1]),
        "splits": {
            split: {"samples": sum(n for _, n in shards), "shards": [{"path": p, "samples": n} for p, n in shards]}
            for split, shards in splits.items()
        },
        **(extra or {}),
    }
    with fsspec.open(join(root, "dataset.json"), "w") as f:
        json.dump(meta, f, indent=1)
    with fsspec.open(join(root, "labels.tsv"), "w") as f:
        f.write("index\tid\tname\trole\n")
        for lab in labels:
            f.write(f"{lab.index}\t{lab.id}\t{lab.name}\t{lab.role}\n")
    buf = io.BytesIO()
    np.save(buf, embeddings.astype(np.float32), allow_pickle=False)
    with fsspec.open(join(root, "embeddings.npy"), "wb") as f:
        f.write(buf.getvalue())
