"""`lesa convert nuswide`: the NUS-WIDE release to the dataset contract, with LESA's split (§4.1).

Files read from the release folder (`--root`), as LESA's code reads them:
- `ImageList/Imagelist.txt`: all 269,648 images; row i of every label file below is image i;
- `ImageList/TrainImagelist.txt`, `ImageList/TestImagelist.txt`: the official train and test split
  (Windows paths `actor\\0001_2124494179.jpg`; matched to Imagelist rows by folder and file name);
- `NUS_WID_Tags/TagList1k.txt` (1,000 Flickr tags) and `NUS_WID_Tags/AllTags1k.txt` (one row of
  1,000 0/1 values per image, tab-separated);
- `Concepts81.txt` (or `ConceptsList/Concepts81.txt`): the 81 human-annotated concepts;
- `AllLabels/Labels_<concept>.txt` (or `Groundtruth/AllLabels/...`): one 0/1 per image;
- the images under `Flickr/<folder>/<file>` (or `--images`).

Labels: seen = the 925 tags of TagList1k that are not concepts, from AllTags1k (noisy user tags);
unseen = the 81 concepts, from AllLabels (human ground truth). Every label is annotated for every
image: 1 -> pos, 0 -> neg, no unknowns. Splits: test = TestImagelist; val = the first `val_size`
images of TrainImagelist (LESA validates on the first 5,000 training records, §3); train = the
rest. Images that are missing, at most `min_bytes` bytes (LESA: 4,000), or byte-identical to
the Flickr placeholder (`--placeholder`) are skipped and reported, as LESA drops them.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, replace

import fsspec
import numpy as np

from datasets.contract import DatasetError, Label, join, read_bytes, write_metadata
from datasets.makers.convert import ImageOptions, ShardJob, SplitReport, run_shards, say, write_report
from datasets.makers.embeddings import label_vectors
from datasets.makers.shards import encode_labels


def _read(url: str) -> bytes:
    return read_bytes(url, "is --root the NUS-WIDE release folder?")


def _first_existing(root: str, *relpaths: str) -> str:
    for rel in relpaths:
        fs, path = fsspec.core.url_to_fs(join(root, rel))
        if fs.exists(path):
            return join(root, rel)
    return join(root, relpaths[0])  # reported as missing by whoever reads it


def read_names(url: str) -> list[str]:
    return [line.strip() for line in _read(url).decode("utf-8-sig").splitlines() if line.strip()]


def image_key(line: str) -> str:
    """`C:\\ImageData\\Flickr\\actor\\0001_2.jpg` (Imagelist) or `actor\\0001_2.jpg` -> `actor/0001_2.jpg`."""
    parts = [p for p in line.strip().replace("\\", "/").split("/") if p]
    return "/".join(parts[-2:])


def read_binary_rows(url: str, width: int | None) -> np.ndarray:
    """A file of 0/1 values, one row per line (tab or space separated) -> uint8 [rows, width].

    Values are single characters, so each line is parsed by picking its '0'/'1' bytes: no
    Python int per value (AllTags1k has 270 million of them).
    """
    rows = []
    try:
        with fsspec.open(url, "rb") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                b = np.frombuffer(line, dtype=np.uint8)
                digits = b[(b == 48) | (b == 49)] - 48
                if width is not None and len(digits) != width:
                    raise DatasetError(f"{url}:{lineno}: {len(digits)} values of 0/1, expected {width}")
                rows.append(digits)
    except FileNotFoundError:
        raise DatasetError(f"{url}: not found (is --root the NUS-WIDE release folder?)") from None
    return np.stack(rows) if rows else np.zeros((0, width or 1), np.uint8)


def build_labels(tags: list[str], concepts: list[str]) -> tuple[list[Label], np.ndarray]:
    """Seen tags (TagList1k order, concepts removed) then the 81 concepts; and the seen tags' columns."""
    concept_set = set(concepts)
    seen_cols = np.array([i for i, t in enumerate(tags) if t not in concept_set], dtype=np.int64)
    labels = [Label(k, tags[c], tags[c], "seen") for k, c in enumerate(seen_cols)]
    labels += [Label(len(seen_cols) + k, c, c, "unseen") for k, c in enumerate(concepts)]
    return labels, seen_cols


def read_label_matrix(root: str, num_tags: int, seen_cols: np.ndarray, concepts: list[str]):
    """Every image's key (Imagelist.txt order) and its 0/1 values uint8 [images, labels] in
    labels.tsv order: the seen tags' columns of AllTags1k, then one AllLabels file per concept."""
    all_url = join(root, "ImageList", "Imagelist.txt")
    all_keys = [image_key(line) for line in _read(all_url).decode("utf-8-sig").splitlines() if line.strip()]
    tags_url = join(root, "NUS_WID_Tags", "AllTags1k.txt")
    tag_rows = read_binary_rows(tags_url, width=num_tags)
    if len(tag_rows) != len(all_keys):
        raise DatasetError(f"{tags_url}: {len(tag_rows)} rows but {all_url} lists {len(all_keys)} images")
    seen_values = tag_rows[:, seen_cols]
    del tag_rows
    labels_dir = _first_existing(root, "AllLabels", "Groundtruth/AllLabels")
    unseen_values = np.zeros((len(all_keys), len(concepts)), np.uint8)
    for k, concept in enumerate(concepts):
        url = join(labels_dir, f"Labels_{concept}.txt")
        column = read_binary_rows(url, width=1)[:, 0]
        if len(column) != len(all_keys):
            raise DatasetError(f"{url}: {len(column)} rows but {all_url} lists {len(all_keys)} images")
        unseen_values[:, k] = column
    return all_keys, np.concatenate([seen_values, unseen_values], axis=1)


def plan_splits(root: str, all_keys: list[str], val_size: int, max_images: int | None, annotations: dict):
    """Imagelist rows of each split: test = TestImagelist, val = the first `val_size` images of
    TrainImagelist, train = the rest (at most `max_images` each; empty splits dropped). Each list's
    images that Imagelist lacks are counted in `annotations` under the list's URL."""
    row_of = {key: i for i, key in enumerate(all_keys)}
    plans = {}
    for name, list_file in (("train", "TrainImagelist.txt"), ("test", "TestImagelist.txt")):
        url = join(root, "ImageList", list_file)
        keys = [image_key(line) for line in _read(url).decode("utf-8-sig").splitlines() if line.strip()]
        unknown = [k for k in keys if k not in row_of]
        annotations[url] = {
            "images": len(keys),
            "not_in_imagelist": {"count": len(unknown), "examples": unknown[:10]},
        }
        plans[name] = [row_of[k] for k in keys if k in row_of]
    plans = {"train": plans["train"][val_size:], "val": plans["train"][:val_size], "test": plans["test"]}
    if max_images is not None:
        plans = {split: rows[:max_images] for split, rows in plans.items()}
    return {split: rows for split, rows in plans.items() if rows}


def shard_jobs(plans: dict[str, list[int]], all_keys: list[str], values: np.ndarray, folder: str, shard_size: int):
    """ShardJobs of every split, built one at a time (labels encoded only when the shard is submitted)."""
    for split, rows in plans.items():
        for index, begin in enumerate(range(0, len(rows), shard_size)):
            part = rows[begin : begin + shard_size]
            keys = [all_keys[r] for r in part]
            encoded = [encode_labels(np.flatnonzero(values[r] == 1), np.flatnonzero(values[r] == 0)) for r in part]
            # A tar key must not hold dots or slashes: `actor/0001_2124494179.jpg` -> `actor_0001_2124494179`.
            sample_keys = [k.rsplit(".", 1)[0].replace("/", "_").replace(".", "_") for k in keys]
            yield ShardJob(split, index, sample_keys, [join(folder, k) for k in keys], encoded)


def convert_nuswide(
    out: str,
    root: str,
    images: str | None = None,
    vectors: str | list[str] | None = None,
    vector_names: str | list[str] | None = None,
    embeddings: str | None = None,
    missing: str = "error",
    val_size: int = 5000,
    shard_size: int = 1000,
    options: ImageOptions = ImageOptions(min_bytes=4000),
    placeholder: str | None = None,
    max_images: int | None = None,
    num_cpus: int | None = None,
    use_ray: bool = True,
    log=say,
) -> dict:
    """Convert the NUS-WIDE release at `root` to the dataset contract at `out`; returns the report."""
    tags = read_names(join(root, "NUS_WID_Tags", "TagList1k.txt"))
    concepts = read_names(_first_existing(root, "Concepts81.txt", "ConceptsList/Concepts81.txt"))
    labels, seen_cols = build_labels(tags, concepts)
    vecs = label_vectors([lab.name for lab in labels], vectors, vector_names, embeddings, missing, log)
    log(f"vocabulary: {len(seen_cols)} seen tags + {len(concepts)} unseen concepts, vectors {vecs.shape}")
    if placeholder:
        options = replace(options, placeholder_sha256=hashlib.sha256(_read(placeholder)).hexdigest())

    all_keys, values = read_label_matrix(root, len(tags), seen_cols, concepts)
    report = {"dataset": out, "source": "nuswide", "splits": {}, "annotations": {}}
    plans = plan_splits(root, all_keys, val_size, max_images, report["annotations"])
    jobs = shard_jobs(plans, all_keys, values, images or join(root, "Flickr"), shard_size)
    split_reports = {split: SplitReport(planned=len(rows)) for split, rows in plans.items()}
    num_jobs = sum(-(-len(rows) // shard_size) for rows in plans.values())
    written = run_shards(jobs, num_jobs, out, options, split_reports, log=log, num_cpus=num_cpus, use_ray=use_ray)
    write_metadata(
        out,
        name="nuswide",
        kind="image",
        labels=labels,
        embeddings=vecs,
        splits={split: written.get(split, []) for split in plans},
        extra={"image_size": options.short_side, "converter": "lesa convert nuswide", "val_size": val_size},
    )
    report["splits"] = {split: asdict(rep) for split, rep in split_reports.items()}
    write_report(out, report, log=log)
    return report
