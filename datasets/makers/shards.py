"""Writing WebDataset shards in the contract: `{split}/{split}-NNNNNN.tar`, samples counted per shard.

Every field is encoded explicitly to bytes here (JPEG, JSON, .npy), so nothing in a shard ever
needs unpickling to read.
"""

from __future__ import annotations

import io
import json

import fsspec
import numpy as np
import webdataset as wds
from PIL import Image

from datasets.contract import join


def encode_jpeg(image: np.ndarray, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def encode_labels(pos, neg) -> bytes:
    return json.dumps({"pos": sorted(int(i) for i in pos), "neg": sorted(int(i) for i in neg)}).encode()


def encode_npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


class ShardFile:
    """One tar shard at `url` (any fsspec URL), written sample by sample; `samples` counts them."""

    def __init__(self, url: str):
        fs, path = fsspec.core.url_to_fs(url)
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        self.url, self.samples = url, 0
        self._file = fsspec.open(url, "wb").open()
        self._tar = wds.TarWriter(self._file)

    def write(self, key: str, fields: dict[str, bytes]) -> None:
        for ext, value in fields.items():
            if not isinstance(value, bytes):
                raise TypeError(f"sample {key}: field {ext} must be encoded to bytes first")
        self._tar.write({"__key__": key, **fields})
        self.samples += 1

    def close(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._file.close()
            self._tar = self._file = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class SplitWriter:
    """Writes one split's samples into numbered shards of at most `maxcount` samples.

    `shards` lists (relative path, samples) for dataset.json once the writer is closed.
    """

    def __init__(self, root: str, split: str, maxcount: int = 1000):
        self.root, self.split, self.maxcount = root, split, maxcount
        self.shards: list[tuple[str, int]] = []
        self._shard: ShardFile | None = None

    def _rotate(self) -> None:
        self._finish()
        relpath = f"{self.split}/{self.split}-{len(self.shards):06d}.tar"
        self._shard = ShardFile(join(self.root, relpath))
        self.shards.append((relpath, 0))

    def _finish(self) -> None:
        if self._shard is not None:
            self._shard.close()
            self._shard = None

    def write(self, key: str, fields: dict[str, bytes]) -> None:
        if self._shard is None or self.shards[-1][1] >= self.maxcount:
            self._rotate()
        self._shard.write(key, fields)
        self.shards[-1] = (self.shards[-1][0], self._shard.samples)

    def close(self) -> list[tuple[str, int]]:
        self._finish()
        return self.shards

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
