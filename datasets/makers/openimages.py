"""`lesa convert openimages`: Open Images human-verified image labels to the dataset contract.

Inputs (docs/datasets.md): `class-descriptions.csv` (`MID,display name`, no header), the seen and
unseen MID lists, `{train,validation,test}-annotations-human-imagelabels.csv`
(`ImageID,Source,LabelName,Confidence`), the images (`<ImageID>.jpg`), and label vectors.

Labels: seen first, then unseen (labels.tsv order). Confidence 1 -> pos, 0 -> neg, no row ->
unknown; rows for MIDs outside the vocabulary are counted and ignored. All rows of an image are
merged wherever they sit in the CSV (LESA's own extractor split images at 40,000-row partition
boundaries, docs/datasets.md). Train keeps only images with at least one annotated seen label;
validation and test keep every image of their CSV, as LESA's test set does.

Memory: one pass over a CSV keeps three compact arrays per row (ImageID bytes, label int32,
value int8) and groups them with one sort, rather than a Python object per row: measured about
115 bytes per row at peak (3M rows in 383 MiB, 160k rows/s on a busy 2-core machine), so a
15M-row train file needs about 1.7 GB.
"""

from __future__ import annotations

import csv
from collections import Counter
from dataclasses import asdict, dataclass

import fsspec
import numpy as np

from datasets.contract import DatasetError, Label, join, write_metadata
from datasets.makers.convert import EXAMPLES, ImageOptions, ShardJob, SplitReport, run_shards, say, write_report
from datasets.makers.embeddings import label_vectors
from datasets.makers.shards import encode_labels

SPLIT_FILES = {"train": "train", "val": "validation", "test": "test"}  # contract split -> OI name
ANNOTATION_COLUMNS = ("ImageID", "LabelName", "Confidence")
CHUNK_ROWS = 1_000_000


def _open_text(url: str, what: str):
    try:
        return fsspec.open(url, "rt", encoding="utf-8-sig", newline="").open()
    except FileNotFoundError:
        raise DatasetError(f"{url}: {what} not found") from None


def read_class_descriptions(url: str) -> dict[str, str]:
    """MID -> display name from `class-descriptions.csv` (no header; a `LabelName,...` header is skipped)."""
    names = {}
    with _open_text(url, "class descriptions") as f:
        for lineno, row in enumerate(csv.reader(f), start=1):
            if not row or (lineno == 1 and row[0] == "LabelName"):
                continue
            if len(row) < 2:
                raise DatasetError(f"{url}:{lineno}: expected 'MID,display name', got {row!r}")
            names.setdefault(row[0].strip(), " ".join(row[1].split()))
    return names


def read_mid_list(url: str) -> list[str]:
    """MIDs from a text file (one per line) or a TSV with a `mid` column."""
    with _open_text(url, "label list") as f:
        lines = [line.rstrip("\r\n") for line in f]
    header = lines[0].split("\t") if lines else []
    if "mid" in header:
        col = header.index("mid")
        rows = [line.split("\t") for line in lines[1:] if line.strip()]
        bad = [i for i, r in enumerate(rows, start=2) if len(r) <= col]
        if bad:
            raise DatasetError(f"{url}:{bad[0]}: no '{header[col]}' column in this row")
        mids = [r[col].strip() for r in rows]
    else:
        mids = [line.strip() for line in lines if line.strip()]
    duplicates = sorted(m for m, n in Counter(mids).items() if n > 1)
    if duplicates:
        raise DatasetError(f"{url}: MIDs listed twice: {', '.join(duplicates[:10])}")
    return mids


def build_vocabulary(seen_url: str, unseen_url: str, descriptions_url: str) -> list[Label]:
    seen, unseen = read_mid_list(seen_url), read_mid_list(unseen_url)
    both = sorted(set(seen) & set(unseen))
    if both:
        raise DatasetError(f"{seen_url} and {unseen_url} share {len(both)} MIDs, e.g. {', '.join(both[:5])}")
    names = read_class_descriptions(descriptions_url)
    unnamed = [m for m in seen + unseen if m not in names]
    if unnamed:
        raise DatasetError(
            f"{descriptions_url}: no name for {len(unnamed)} MIDs of the label lists, e.g. {', '.join(unnamed[:5])}"
        )
    return [Label(i, m, names[m], "seen") for i, m in enumerate(seen)] + [
        Label(len(seen) + i, m, names[m], "unseen") for i, m in enumerate(unseen)
    ]


@dataclass
class GroupedLabels:
    """Every image of one annotation file with its rows, grouped: image i owns rows starts[i]:starts[i+1]."""

    image_ids: np.ndarray  # bytes (S), sorted
    starts: np.ndarray  # int64 [images + 1]
    labels: np.ndarray  # int32 label index, -1 for a MID outside the vocabulary
    values: np.ndarray  # int8 +1 present, -1 absent

    def __len__(self) -> int:
        return len(self.image_ids)

    def pos_neg(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        rows = slice(self.starts[i], self.starts[i + 1])
        labels, values = self.labels[rows], self.values[rows]
        known = labels >= 0
        pos = np.unique(labels[known & (values > 0)])
        # A label verified both present and absent (two sources disagree) counts as present.
        neg = np.setdiff1d(labels[known & (values < 0)], pos)
        return pos, neg


def _counter() -> dict:
    return {"count": 0, "examples": []}


def _count(counter: dict, example) -> None:
    counter["count"] += 1
    if len(counter["examples"]) < EXAMPLES and example not in counter["examples"]:
        counter["examples"].append(example)


def _annotation_columns(url: str, header: list[str]) -> tuple[int, int, int]:
    """Positions of ImageID, LabelName and Confidence in the CSV's header row."""
    missing = [c for c in ANNOTATION_COLUMNS if c not in header]
    if missing:
        raise DatasetError(
            f"{url}: malformed header {','.join(header)!r}: expected the columns "
            f"ImageID,Source,LabelName,Confidence (missing {', '.join(missing)})"
        )
    col_id, col_label, col_conf = (header.index(c) for c in ANNOTATION_COLUMNS)
    return col_id, col_label, col_conf


def _chunk(ids: list[bytes], labels: list[int], values: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The rows gathered so far as three compact arrays; the lists are emptied for the next chunk."""
    chunk = (np.array(ids, dtype=bytes), np.array(labels, dtype=np.int32), np.array(values, dtype=np.int8))
    ids.clear(), labels.clear(), values.clear()
    return chunk


def annotation_chunks(url: str, label_index: dict[str, int], chunk_rows: int, stats: dict):
    """Stream the CSV's rows as (ImageID bytes, label int32, value int8) arrays of up to `chunk_rows`
    rows. A row for a MID outside the vocabulary keeps label -1; it and bad rows (short, no ImageID,
    a Confidence other than 0 or 1) are counted in `stats`, and bad rows dropped."""
    ids: list[bytes] = []
    labels: list[int] = []
    values: list[int] = []
    with _open_text(url, "annotation file") as f:
        reader = csv.reader(f)
        col_id, col_label, col_conf = _annotation_columns(url, next(reader, []))
        width = max(col_id, col_label, col_conf) + 1
        for lineno, row in enumerate(reader, start=2):
            if not row:
                continue
            stats["rows"] += 1
            if len(row) < width or not row[col_id]:
                _count(stats["bad_rows"], f"line {lineno}: {','.join(row)[:80]}")
                continue
            conf = row[col_conf].strip()
            value = 1 if conf in ("1", "1.0") else -1 if conf in ("0", "0.0") else 0
            if value == 0:
                _count(stats["bad_rows"], f"line {lineno}: Confidence {conf!r}")
                continue
            label = label_index.get(row[col_label], -1)
            if label < 0:
                _count(stats["rows_outside_vocabulary"], row[col_label])
            ids.append(row[col_id].encode())
            labels.append(label)
            values.append(value)
            if len(ids) >= chunk_rows:
                yield _chunk(ids, labels, values)
    if ids:
        yield _chunk(ids, labels, values)


def group_chunks(chunks: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> GroupedLabels:
    """All chunks' rows, sorted by ImageID so each image's rows sit together wherever they were in
    the file. `chunks` is emptied once concatenated: the joined arrays are all that is kept."""
    if not chunks:
        empty = np.array([], dtype="S1")
        return GroupedLabels(empty, np.zeros(1, np.int64), np.array([], np.int32), np.array([], np.int8))
    all_ids = np.concatenate([c[0] for c in chunks])
    all_labels = np.concatenate([c[1] for c in chunks])
    all_values = np.concatenate([c[2] for c in chunks])
    chunks.clear()
    # One sort brings every image's rows together, wherever they were in the file.
    order = np.argsort(all_ids, kind="stable")
    all_ids, all_labels, all_values = all_ids[order], all_labels[order], all_values[order]
    del order
    first = np.flatnonzero(np.r_[True, all_ids[1:] != all_ids[:-1]])
    starts = np.r_[first, len(all_ids)].astype(np.int64)
    return GroupedLabels(all_ids[first], starts, all_labels, all_values)


def read_annotations(url: str, label_index: dict[str, int], chunk_rows: int = CHUNK_ROWS) -> tuple[GroupedLabels, dict]:
    """Stream one `*-annotations-human-imagelabels.csv` into GroupedLabels and its row statistics."""
    stats = {"rows": 0, "rows_outside_vocabulary": _counter(), "bad_rows": _counter()}
    chunks = list(annotation_chunks(url, label_index, chunk_rows, stats))
    return group_chunks(chunks), stats


def select_images(grouped: GroupedLabels, num_seen: int, require_seen: bool) -> np.ndarray:
    """Indices of the images to write: all, or (train) those with an annotated seen label."""
    if not require_seen or len(grouped) == 0:
        return np.arange(len(grouped))
    is_seen = ((grouped.labels >= 0) & (grouped.labels < num_seen)).astype(np.int8)
    has_seen = np.maximum.reduceat(is_seen, grouped.starts[:-1])
    return np.flatnonzero(has_seen)


def image_folder(images: str, split: str) -> str:
    """`--images` may name one folder for all splits, or a template with `{split}` (train/validation/test)."""
    return images.replace("{split}", SPLIT_FILES[split]) if "{split}" in images else images


def shard_jobs(split: str, grouped: GroupedLabels, chosen: np.ndarray, images: str, shard_size: int):
    """ShardJobs of one split, built one at a time (labels encoded only when the shard is submitted)."""
    folder = image_folder(images, split)
    for index, begin in enumerate(range(0, len(chosen), shard_size)):
        part = chosen[begin : begin + shard_size]
        keys = [grouped.image_ids[i].decode() for i in part]
        encoded = [encode_labels(*grouped.pos_neg(i)) for i in part]
        yield ShardJob(split, index, keys, [join(folder, f"{k}.jpg") for k in keys], encoded)


def plan_split(
    split: str, annotations: str, label_index: dict[str, int], num_seen: int, max_images: int | None, log
) -> tuple[GroupedLabels, np.ndarray, str, dict]:
    """One split's annotations read and its images chosen: (grouped rows, chosen image indices,
    the CSV's URL, its statistics for the report)."""
    if split not in SPLIT_FILES:
        raise DatasetError(f"unknown split {split!r}: expected one of {', '.join(SPLIT_FILES)}")
    csv_url = join(annotations, f"{SPLIT_FILES[split]}-annotations-human-imagelabels.csv")
    log(f"{split}: reading {csv_url}")
    grouped, stats = read_annotations(csv_url, label_index)
    chosen = select_images(grouped, num_seen, require_seen=(split == "train"))
    stats["images"] = len(grouped)
    stats["images_without_seen_label"] = len(grouped) - len(chosen) if split == "train" else 0
    if max_images is not None:
        chosen = chosen[:max_images]
    log(
        f"{split}: {stats['rows']:,} rows, {len(grouped):,} images, {len(chosen):,} to write; "
        f"{stats['rows_outside_vocabulary']['count']:,} rows for MIDs outside the vocabulary"
    )
    return grouped, chosen, csv_url, stats


def convert_openimages(
    out: str,
    descriptions: str,
    seen: str,
    unseen: str,
    annotations: str,
    images: str,
    vectors: str | list[str] | None = None,
    vector_names: str | list[str] | None = None,
    embeddings: str | None = None,
    missing: str = "error",
    splits: tuple[str, ...] = ("train", "val", "test"),
    shard_size: int = 1000,
    options: ImageOptions = ImageOptions(),
    max_images: int | None = None,
    num_cpus: int | None = None,
    use_ray: bool = True,
    log=say,
) -> dict:
    """Convert Open Images to the dataset contract at `out`; returns the report (also written there)."""
    labels = build_vocabulary(seen, unseen, descriptions)
    num_seen = sum(lab.role == "seen" for lab in labels)
    vecs = label_vectors([lab.name for lab in labels], vectors, vector_names, embeddings, missing, log)
    log(f"vocabulary: {num_seen} seen + {len(labels) - num_seen} unseen labels, vectors {vecs.shape}")

    label_index = {lab.id: lab.index for lab in labels}
    report = {"dataset": out, "source": "openimages", "splits": {}, "annotations": {}}
    split_reports: dict[str, SplitReport] = {}
    plans = []
    for split in splits:
        grouped, chosen, csv_url, stats = plan_split(split, annotations, label_index, num_seen, max_images, log)
        report["annotations"][csv_url] = stats
        split_reports[split] = SplitReport(planned=len(chosen))
        plans.append((split, grouped, chosen))

    num_jobs = sum(-(-len(chosen) // shard_size) for _, _, chosen in plans)
    jobs = (job for split, grouped, chosen in plans for job in shard_jobs(split, grouped, chosen, images, shard_size))
    written = run_shards(jobs, num_jobs, out, options, split_reports, log=log, num_cpus=num_cpus, use_ray=use_ray)
    write_metadata(
        out,
        name="openimages",
        kind="image",
        labels=labels,
        embeddings=vecs,
        splits={split: written.get(split, []) for split in splits},
        extra={"image_size": options.short_side, "converter": "lesa convert openimages"},
    )
    report["splits"] = {split: asdict(rep) for split, rep in split_reports.items()}
    write_report(out, report, log=log)
    return report
