"""LESA's evaluation protocol (docs/protocol.md, Evaluation protocol), single-process and exactly distributed.

- Top-K: per image the K highest scores are predicted (ties broken by label order, so results
  are deterministic); TP counted over all (image, label) pairs of all images; P = TP / (N K),
  R = TP / #positives, F1 = 2PR / (P + R). Unknown labels predicted count as false positives.
- mAP: per label, sklearn's non-interpolated AP over the images annotated for it (y != 0); a label
  without a positive gets AP 0 and stays in the mean. All values in percent.

Distributed (StreamingMetrics): every worker scores a disjoint part of the images and keeps, batch
by batch, only its top-K hit counts and the annotated cells' scores. Top-K counts are summed. AP
is label-sharded: each worker receives, from every worker, the annotated cells of the labels it
owns. `compute_metrics` / `per_label_ap` are the plain single-process reference, one label at a
time; `grouped_average_precision` is the fast path, all labels in one sort.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from trainer.distributed import distributed
from trainer.evaluation.kth_kernel import kth_largest_f32

ROW_CHUNK = 4096  # rows sorted at once, to bound temporaries


def average_precision(scores: np.ndarray, labels: np.ndarray) -> float:
    """AP of one label over its annotated images, equal to sklearn's average_precision_score."""
    annotated = labels != 0
    scores, positive = scores[annotated], labels[annotated] > 0
    num_pos = int(positive.sum())
    if num_pos == 0:
        return 0.0
    order = np.argsort(-scores, kind="stable")
    scores, positive = scores[order], positive[order]
    tp = np.cumsum(positive)
    threshold_ends = np.r_[np.flatnonzero(np.diff(scores)), len(scores) - 1]  # ties form one step
    tp = tp[threshold_ends]
    precision = tp / (threshold_ends + 1)
    recall = tp / num_pos
    return float(np.sum(np.diff(recall, prepend=0.0) * precision))


def per_label_ap(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    return np.array([average_precision(scores[:, j], labels[:, j]) for j in range(scores.shape[1])])


def topk_true_positives(scores: np.ndarray, labels: np.ndarray, k: int) -> int:
    """Reference top-K: a stable sort per row, so ties go to the lower label index."""
    tp = 0
    for start in range(0, len(scores), ROW_CHUNK):
        s, y = scores[start : start + ROW_CHUNK], labels[start : start + ROW_CHUNK]
        top = np.argsort(-s, axis=1, kind="stable")[:, :k]
        tp += int((np.take_along_axis(y, top, axis=1) > 0).sum())
    return tp


def _local_counts(scores, labels, ks) -> np.ndarray:
    """[num_images, num_positives, TP@k1, TP@k2, ...] of this worker's images."""
    return np.array(
        [len(scores), int((labels > 0).sum())] + [topk_true_positives(scores, labels, k) for k in ks], dtype=np.int64
    )


def _summarise(counts: np.ndarray, ap: np.ndarray, ks, num_labels: int) -> dict[str, float]:
    num_images, num_pos = int(counts[0]), int(counts[1])
    out = {}
    for k, tp in zip(ks, counts[2:]):
        kk = min(k, num_labels)
        p = tp / (num_images * kk) if num_images else 0.0
        r = tp / num_pos if num_pos else 0.0
        f1 = 2 * p * r / (p + r) if p + r > 0 else 0.0
        out.update({f"P@{k}": 100 * p, f"R@{k}": 100 * r, f"F1@{k}": 100 * f1})
    out["mAP"] = 100 * float(ap.mean()) if len(ap) else 0.0
    return out


def compute_metrics(scores: np.ndarray, labels: np.ndarray, ks) -> dict[str, float]:
    """The single-process reference: the whole score matrix of one setting at once."""
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels)
    return _summarise(_local_counts(scores, labels, ks), per_label_ap(scores, labels), ks, scores.shape[1])


@dataclass
class Annotations:
    """The annotated cells of a worker's images x labels: row, label, +1 / -1. Unknown cells are
    absent, so memory follows the annotations (a few per image on Open Images), not the matrix."""

    rows: np.ndarray
    cols: np.ndarray
    values: np.ndarray

    @classmethod
    def from_dense(cls, labels: np.ndarray, row_offset: int = 0) -> "Annotations":
        rows, cols = np.nonzero(labels)
        return cls(rows + row_offset, cols.astype(np.int32), labels[rows, cols].astype(np.int8))

    @classmethod
    def concatenate(cls, parts: list["Annotations"]) -> "Annotations":
        if not parts:
            return cls(np.zeros(0, np.int64), np.zeros(0, np.int32), np.zeros(0, np.int8))
        return cls(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("rows", "cols", "values")))


SORT_BELOW = 2048  # rows narrower than this are sorted: the kernel's groups need width (docs/performance.md)


def ascending_key(values: np.ndarray) -> np.ndarray:
    """uint64 keys that sort as the scores do, equal exactly where the scores are equal.

    float32 maps bit-wise (flip the sign bit of positives, every bit of negatives), so a key fits
    in 32 bits and can share one integer sort with the label id in the high bits (AP); numpy's
    vectorised integer sort is ~10x faster than a lexsort over (label, score). Other dtypes, rarer,
    take their rank.
    """
    if values.dtype != np.float32:
        return np.unique(values, return_inverse=True)[1].astype(np.uint64).reshape(values.shape)
    bits = (values + np.float32(0)).view(np.uint32)  # + 0 turns -0.0 into 0.0: one tie, one key
    return (bits ^ np.where(bits >> 31, np.uint32(0xFFFFFFFF), np.uint32(0x80000000))).astype(np.uint64)


def kth_largest(scores: np.ndarray, ks) -> np.ndarray:
    """[rows, len(ks)]: the k-th largest score of every row for each k in `ks` (all <= columns).

    Wide float32 rows (GZSL's 7,586 labels) go through the one-pass C kernel (trainer/evaluation/kth_kernel.py);
    narrow rows, other dtypes, or a machine without a C compiler through numpy's vectorised sort.
    """
    ks = np.asarray(ks)
    if scores.shape[1] >= SORT_BELOW and scores.dtype == np.float32:
        found = kth_largest_f32(scores, ks)
        if found is not None:
            return found
    out = np.empty((len(scores), len(ks)), dtype=scores.dtype)
    for start in range(0, len(scores), ROW_CHUNK):
        ordered = np.sort(scores[start : start + ROW_CHUNK], axis=1)
        out[start : start + len(ordered)] = ordered[:, scores.shape[1] - ks]
    return out


def kth_largest_rows(scores: torch.Tensor, ks) -> torch.Tensor:
    """`kth_largest` on the scores' device: torch.topk on a GPU, where it is nearly free; on the
    CPU the kernel, 3.5x cheaper than torch.topk (docs/performance.md)."""
    if scores.device.type == "cpu":
        return torch.from_numpy(kth_largest(scores.numpy(), ks))
    return torch.topk(scores, max(ks), dim=1).values[:, torch.as_tensor(ks, device=scores.device) - 1]


TIE_ROWS = 1024  # rows compared at once when positives tie with the K-th score


def topk_hits(scores: torch.Tensor, pos_rows: torch.Tensor, pos_cols: torch.Tensor, ks) -> list[int]:
    """TP at each K from the positive cells only, with ties broken by label order.

    The K-th largest score v of each row: a positive above v is predicted; one equal to v is
    predicted if the scores above v plus the ties at lower label indices leave it a place,
    exactly the set a stable sort by descending score gives. Cost: the K-th scores plus
    O(positives), and one row scan per positive that ties with v.
    """
    num_labels = scores.shape[1]
    ks = [min(k, num_labels) for k in ks]
    if len(scores) == 0 or num_labels == 0:
        return [0] * len(ks)
    kth = kth_largest_rows(scores, ks)
    value = scores[pos_rows, pos_cols]
    label_index = torch.arange(num_labels, device=scores.device)
    hits = []
    for i, k in enumerate(ks):
        kth_k = kth[pos_rows, i]
        hit = value > kth_k
        for tied in torch.nonzero(value == kth_k).flatten().split(TIE_ROWS):
            rows, v = scores[pos_rows[tied]], kth_k[tied, None]
            ahead = (rows > v).sum(1) + ((rows == v) & (label_index < pos_cols[tied, None])).sum(1)
            hit[tied] = ahead < k
        hits.append(int(hit.sum()))
    return hits


def grouped_average_precision(
    label: np.ndarray, score: np.ndarray, positive: np.ndarray, num_labels: int
) -> np.ndarray:
    """AP of every label at once from its annotated entries (label id, score, is-positive).

    One integer sort orders the entries by label, then by descending score: the key packs the
    label, the score's order key and the positive bit. Runs of equal (label, score) form one
    threshold, exactly as sklearn groups ties. Labels without entries or a positive get 0.
    """
    ap = np.zeros(num_labels)
    if len(label) == 0:
        return ap
    descending = np.uint64(0xFFFFFFFF) - ascending_key(score)
    key = np.sort(
        (label.astype(np.uint64) << np.uint64(33)) | (descending << np.uint64(1)) | positive.astype(np.uint64)
    )
    label, threshold, positive = key >> np.uint64(33), key >> np.uint64(1), (key & np.uint64(1)).astype(np.int64)
    starts = np.flatnonzero(np.r_[True, label[1:] != label[:-1]])
    group = np.repeat(np.arange(len(starts)), np.diff(np.r_[starts, len(label)]))
    tp = np.cumsum(positive)
    tp = tp - (tp - positive)[starts][group]  # true positives within the label
    seen = np.arange(len(label)) - starts[group] + 1  # entries within the label so far
    ends = np.flatnonzero(np.r_[threshold[1:] != threshold[:-1], True])  # (label, score) changes
    num_pos = np.bincount(group, weights=positive)
    g = group[ends]
    recall = tp[ends] / np.maximum(num_pos[g], 1)
    step_start = np.r_[True, g[1:] != g[:-1]]
    recall_gain = recall - np.where(step_start, 0.0, np.r_[0.0, recall[:-1]])
    per_group = np.bincount(g, weights=recall_gain * tp[ends] / seen[ends], minlength=len(starts))
    ap[label[starts].astype(np.int64)] = per_group
    return ap


@dataclass
class LabelStats:
    """Per label, over all workers: AP (fraction), positives and annotated images."""

    ap: np.ndarray
    positives: np.ndarray
    annotated: np.ndarray


def label_statistics(entries: "Entries", num_labels: int, device="cpu") -> LabelStats:
    """Per-label AP and counts; label-sharded when distributed (label j is owned by rank j % W).

    Each worker sends every owner only the annotated cells of that owner's labels, so a worker
    holds the annotated cells of its own images plus those of 1/W of the labels.
    """
    counts = np.stack(
        [
            np.bincount(entries.labels[entries.positive], minlength=num_labels),
            np.bincount(entries.labels, minlength=num_labels),
        ]
    ).astype(np.int64)
    if not distributed():
        return LabelStats(grouped_average_precision(*entries.fields(), num_labels), *counts)
    rank, world = dist.get_rank(), dist.get_world_size()
    owner_of = entries.labels % world
    mine = None
    for owner in range(world):
        received = [None] * world if rank == owner else None
        dist.gather_object(entries.select(owner_of == owner).fields(), received, dst=owner)
        if rank == owner:
            mine = [np.concatenate(parts) for parts in zip(*received)]
            del received
    ap_mine = grouped_average_precision(*mine, num_labels)[rank::world]
    gathered = [None] * world
    dist.all_gather_object(gathered, ap_mine)
    ap = np.empty(num_labels)
    for owner, values in enumerate(gathered):
        ap[owner::world] = values
    total = torch.from_numpy(counts).to(device)
    dist.all_reduce(total)
    return LabelStats(ap, *total.cpu().numpy())


@dataclass
class Entries:
    """The annotated cells as AP needs them: label id, score, is-positive."""

    labels: np.ndarray
    scores: np.ndarray
    positive: np.ndarray

    def fields(self):
        return self.labels, self.scores, self.positive

    def select(self, keep: np.ndarray) -> "Entries":
        return Entries(*(f[keep] for f in self.fields()))

    @classmethod
    def concatenate(cls, parts: list["Entries"]) -> "Entries":
        if not parts:
            return cls(np.zeros(0, np.int32), np.zeros(0, np.float32), np.zeros(0, bool))
        return cls(*(np.concatenate(f) for f in zip(*(p.fields() for p in parts))))


class StreamingMetrics:
    """One worker's evaluation, fed batch by batch where the scores are produced.

    A batch leaves behind only what the metrics need: per setting, its top-K hit counts (the K-th
    scores found on the scores' device, see kth_largest_rows) and, for AP, the (label, score,
    positive) of its annotated cells. No worker ever holds a score matrix: memory follows the
    annotations (a few per image on Open Images). `result` combines all workers (a collective).
    """

    def __init__(self, settings: dict[str, np.ndarray], num_labels: int, ks):
        self.num_labels, self.ks = num_labels, list(ks)
        self.settings = {}  # name -> (label ids, the same as a tensor or None for all labels, position)
        for name, cols in settings.items():
            cols = np.asarray(cols)
            position = np.full(num_labels, -1, dtype=np.int64)  # label id -> column in the setting
            position[cols] = np.arange(len(cols))
            whole = len(cols) == num_labels and np.array_equal(cols, np.arange(num_labels))
            self.settings[name] = (cols, None if whole else torch.as_tensor(cols), position)
        self.counts = {name: np.zeros(2 + len(self.ks), dtype=np.int64) for name in settings}
        self.entries: list[Entries] = []

    def add(self, scores: torch.Tensor, cells: Annotations) -> None:
        """Scores [B, num_labels] of one batch, on any device; its annotated cells (rows 0..B-1)."""
        scores = scores.detach()
        if scores.dtype != torch.float64:  # bf16 / fp16 model outputs; float64 stays exact
            scores = scores.float()
        rows, cols = (torch.from_numpy(a).to(scores.device) for a in (cells.rows, cells.cols.astype(np.int64)))
        positive = cells.values > 0
        self.entries.append(Entries(cells.cols, scores[rows, cols].cpu().numpy(), positive))
        for name, (_, columns, position) in self.settings.items():
            in_setting = positive & (position[cells.cols] >= 0)
            keep = torch.from_numpy(in_setting).to(scores.device)
            setting_cols = torch.from_numpy(position[cells.cols[in_setting]]).to(scores.device)
            part = scores if columns is None else scores.index_select(1, columns.to(scores.device))
            hits = topk_hits(part, rows[keep], setting_cols, self.ks)
            self.counts[name] += np.array([len(scores), int(in_setting.sum()), *hits], dtype=np.int64)

    def result(self, device="cpu") -> tuple[dict[str, dict[str, float]], LabelStats]:
        stats = label_statistics(Entries.concatenate(self.entries), self.num_labels, device)
        results = {}
        for name, (cols, _, _) in self.settings.items():
            counts = self.counts[name]
            if distributed():
                total = torch.from_numpy(counts.copy()).to(device)
                dist.all_reduce(total)
                counts = total.cpu().numpy()
            results[name] = _summarise(counts, stats.ap[cols], self.ks, len(cols))
        return results, stats


def evaluate_settings(
    scores: np.ndarray, labels: np.ndarray | Annotations, settings: dict[str, np.ndarray], ks, device="cpu"
) -> dict[str, dict[str, float]]:
    """Metrics for each setting (name -> column indices) of a worker's score matrix, over all
    workers if distributed; equals compute_metrics per setting. The matrix is fed to
    StreamingMetrics in blocks of ROW_CHUNK rows. `labels`: the dense label matrix or its
    Annotations."""
    ann = labels if isinstance(labels, Annotations) else Annotations.from_dense(labels)
    order = np.argsort(ann.rows, kind="stable")
    ann = Annotations(ann.rows[order], ann.cols[order], ann.values[order])
    metrics = StreamingMetrics(settings, scores.shape[1], ks)
    for start in range(0, len(scores), ROW_CHUNK):
        block = scores[start : start + ROW_CHUNK]
        lo, hi = np.searchsorted(ann.rows, [start, start + len(block)])
        metrics.add(
            torch.from_numpy(np.ascontiguousarray(block)),
            Annotations(ann.rows[lo:hi] - start, ann.cols[lo:hi], ann.values[lo:hi]),
        )
    return metrics.result(device)[0]
