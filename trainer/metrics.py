"""LESA's evaluation protocol (lesa_spec §5), single-process and exactly distributed.

- Top-K: per image the K highest scores are predicted (ties broken by label order, so results
  are deterministic); TP counted over all (image, label) pairs of all images; P = TP / (N K),
  R = TP / #positives, F1 = 2PR / (P + R). Unknown labels predicted count as false positives.
- mAP: per label, sklearn's non-interpolated AP over the images annotated for it (y != 0); a label
  without a positive gets AP 0 and stays in the mean. All values in percent.

Distributed: every worker holds the scores of a disjoint part of the images. Top-K counts are
summed. AP is label-sharded: each worker receives, from every worker, the annotated cells of the
labels it owns, so it never holds the whole matrix. `per_label_ap` is the plain reference, one
label at a time; `grouped_average_precision` is the fast path, all labels in one sort.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

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
        s, y = scores[start:start + ROW_CHUNK], labels[start:start + ROW_CHUNK]
        top = np.argsort(-s, axis=1, kind="stable")[:, :k]
        tp += int((np.take_along_axis(y, top, axis=1) > 0).sum())
    return tp


def _local_counts(scores, labels, ks) -> np.ndarray:
    """[num_images, num_positives, TP@k1, TP@k2, ...] of this worker's images."""
    return np.array([len(scores), int((labels > 0).sum())]
                    + [topk_true_positives(scores, labels, k) for k in ks], dtype=np.int64)


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


KTH_CHUNK = 64      # rows per pass of kth_largest: their scores stay in cache between passes
KTH_GROUPS = 16     # columns per group in the group-maximum filter of kth_largest
SORT_BELOW = 2048   # rows narrower than this are fully sorted instead (measured: docs/performance.md)


def kth_largest(scores: np.ndarray, ks) -> np.ndarray:
    """[rows, len(ks)]: the k-th largest score of every row for each k in `ks` (all <= columns).

    Wide rows (GZSL's 7,586 labels) go through a filter about 2x cheaper than a partial sort of
    every row; narrow ones through numpy's vectorised sort. The filter: fold each row into
    G = ceil(C / KTH_GROUPS) strided groups (column j belongs to group j mod G) and take every
    group's maximum: k groups have a maximum >= the k-th largest group maximum `lb`, so
    lb <= the k-th largest score, and every score that ranks in the top k is >= lb. Only the
    few scores >= lb of each row (about k) are then sorted.
    """
    n, num_labels = scores.shape
    kmax = max(ks)
    if num_labels < SORT_BELOW:  # short rows: numpy's vectorised full sort beats any selection
        out = np.empty((n, len(ks)), dtype=scores.dtype)
        for start in range(0, n, ROW_CHUNK):
            ordered = np.sort(scores[start:start + ROW_CHUNK], axis=1)
            out[start:start + len(ordered)] = ordered[:, num_labels - np.asarray(ks)]
        return out
    groups = max(1, min(KTH_GROUPS, num_labels // kmax))
    width = -(-num_labels // groups)
    out = np.empty((n, len(ks)), dtype=scores.dtype)
    for start in range(0, n, KTH_CHUNK):
        block = np.ascontiguousarray(scores[start:start + KTH_CHUNK])
        rows = len(block)
        group_max = block[:, :width].copy()
        for lo in range(width, num_labels, width):
            hi = min(lo + width, num_labels)
            np.maximum(group_max[:, :hi - lo], block[:, lo:hi], out=group_max[:, :hi - lo])
        lb = np.partition(group_max, width - kmax, axis=1)[:, width - kmax]
        flat = np.flatnonzero(block >= lb[:, None])
        row, value = flat // num_labels, block.reshape(-1)[flat]
        order = np.lexsort((-value, row))                     # by row, then descending score
        first = np.searchsorted(row[order], np.arange(rows))  # every row has >= kmax candidates
        out[start:start + rows] = value[order][first[:, None] + np.asarray(ks)[None, :] - 1]
    return out


def topk_hits(scores: np.ndarray, pos_rows: np.ndarray, pos_cols: np.ndarray, ks) -> list[int]:
    """TP at each K from the positive cells only, with ties broken by label order.

    The K-th largest score v of each row: a positive above v is predicted; one equal to v is
    predicted if the scores above v plus the ties at lower label indices leave it a place,
    exactly the set a stable sort by descending score gives. Cost: `kth_largest` plus
    O(positives).
    """
    num_labels = scores.shape[1]
    ks_clipped = [min(k, num_labels) for k in ks]
    order = np.argsort(pos_rows, kind="stable")
    pos_rows, pos_cols = pos_rows[order], pos_cols[order]
    tps = [0] * len(ks)
    for start in range(0, len(scores), ROW_CHUNK):
        block = scores[start:start + ROW_CHUNK]
        kth_all = kth_largest(block, ks_clipped)
        lo, hi = np.searchsorted(pos_rows, [start, start + len(block)])
        r, c = pos_rows[lo:hi] - start, pos_cols[lo:hi]
        value = block[r, c]
        for i, k in enumerate(ks_clipped):
            kth = kth_all[r, i]
            hit = value > kth
            for t in np.flatnonzero(value == kth):  # rare: a positive scored exactly the K-th score
                row = block[r[t]]
                hit[t] = (row > kth[t]).sum() + (row[:c[t]] == kth[t]).sum() < k
            tps[i] += int(hit.sum())
    return tps


def grouped_average_precision(label: np.ndarray, score: np.ndarray, positive: np.ndarray,
                              num_labels: int) -> np.ndarray:
    """AP of every label at once from its annotated entries (label id, score, is-positive).

    One lexsort orders the entries by label, then by descending score; runs of equal (label,
    score) form one threshold, exactly as sklearn groups ties. Labels without entries or without
    a positive get 0.
    """
    ap = np.zeros(num_labels)
    if len(label) == 0:
        return ap
    order = np.lexsort((-score, label))
    label, score, positive = label[order], score[order], positive[order]
    starts = np.flatnonzero(np.r_[True, label[1:] != label[:-1]])
    group = np.repeat(np.arange(len(starts)), np.diff(np.r_[starts, len(label)]))
    tp = np.cumsum(positive)
    tp = tp - (tp - positive)[starts][group]                 # true positives within the label
    seen = np.arange(len(label)) - starts[group] + 1          # entries within the label so far
    ends = np.flatnonzero(np.r_[(label[1:] != label[:-1]) | (score[1:] != score[:-1]), True])
    num_pos = np.bincount(group, weights=positive)
    g = group[ends]
    recall = tp[ends] / np.maximum(num_pos[g], 1)
    step_start = np.r_[True, g[1:] != g[:-1]]
    recall_gain = recall - np.where(step_start, 0.0, np.r_[0.0, recall[:-1]])
    per_group = np.bincount(g, weights=recall_gain * tp[ends] / seen[ends], minlength=len(starts))
    ap[label[starts]] = per_group
    return ap


def annotated_entries(scores: np.ndarray, ann: Annotations, keep: np.ndarray | None = None):
    """(label id, score, is-positive) of the annotated cells, or of those selected by `keep`."""
    rows, cols, values = (ann.rows, ann.cols, ann.values) if keep is None else \
        (ann.rows[keep], ann.cols[keep], ann.values[keep])
    return cols, scores[rows, cols], values > 0


@dataclass
class LabelStats:
    """Per label, over all workers: AP (fraction), positives and annotated images."""
    ap: np.ndarray
    positives: np.ndarray
    annotated: np.ndarray


def label_statistics(scores: np.ndarray, ann: Annotations, num_labels: int, device="cpu") -> LabelStats:
    """Per-label AP and counts; label-sharded when distributed (label j is owned by rank j % W).

    Each worker sends every owner only the annotated cells of that owner's labels, so a worker
    holds its own rows plus the annotated cells of 1/W of the labels, never the whole matrix.
    """
    counts = np.stack([np.bincount(ann.cols[ann.values > 0], minlength=num_labels),
                       np.bincount(ann.cols, minlength=num_labels)]).astype(np.int64)
    if not _distributed():
        return LabelStats(grouped_average_precision(*annotated_entries(scores, ann), num_labels), *counts)
    rank, world = dist.get_rank(), dist.get_world_size()
    owner_of = ann.cols % world
    mine = None
    for owner in range(world):
        received = [None] * world if rank == owner else None
        dist.gather_object(annotated_entries(scores, ann, owner_of == owner), received, dst=owner)
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


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def evaluate_labels(scores: np.ndarray, labels: np.ndarray | Annotations, settings: dict[str, np.ndarray], ks,
                    device="cpu") -> tuple[dict[str, dict[str, float]], LabelStats]:
    """Metrics for each setting (name -> column indices) and the per-label statistics.

    `labels` is this worker's dense label matrix or its Annotations. AP is per label, so it is
    computed once for every column and each setting takes its own; top-K depends on the label
    set and is counted per setting.
    """
    num_labels = scores.shape[1]
    ann = labels if isinstance(labels, Annotations) else Annotations.from_dense(labels)
    stats = label_statistics(scores, ann, num_labels, device)
    positive = ann.values > 0
    results = {}
    for name, cols in settings.items():
        whole = len(cols) == num_labels and np.array_equal(cols, np.arange(num_labels))
        position = np.full(num_labels, -1, dtype=np.int64)
        position[cols] = np.arange(len(cols))
        in_setting = positive & (position[ann.cols] >= 0)
        hits = topk_hits(scores if whole else scores[:, cols], ann.rows[in_setting],
                         position[ann.cols[in_setting]], ks)
        counts = np.array([len(scores), int(in_setting.sum()), *hits], dtype=np.int64)
        if _distributed():
            total = torch.from_numpy(counts).to(device)
            dist.all_reduce(total)
            counts = total.cpu().numpy()
        results[name] = _summarise(counts, stats.ap[cols], ks, len(cols))
    return results, stats


def evaluate_settings(scores: np.ndarray, labels: np.ndarray, settings: dict[str, np.ndarray], ks,
                      device="cpu") -> dict[str, dict[str, float]]:
    """Metrics for each setting, over all workers if distributed; equals compute_metrics per setting."""
    return evaluate_labels(scores, labels, settings, ks, device)[0]
