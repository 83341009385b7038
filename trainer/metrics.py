"""LESA's evaluation protocol (lesa_spec §5), single-process and exactly distributed.

- Top-K: per image the K highest scores are predicted (ties broken by label order, so results
  are deterministic); TP counted over all (image, label) pairs of all images; P = TP / (N K),
  R = TP / #positives, F1 = 2PR / (P + R). Unknown labels predicted count as false positives.
- mAP: per label, sklearn's non-interpolated AP over the images annotated for it (y != 0); a label
  without a positive gets AP 0 and stays in the mean. All values in percent.

Distributed: every worker holds the scores of a disjoint part of the images. Top-K counts are
summed. AP is label-sharded: each worker receives, from every worker, the columns of the labels
it owns, so it holds (all images) x (its labels) and never the whole matrix.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

ROW_CHUNK = 4096  # rows argsorted at once, to bound the temporary index matrix


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


def _distributed_ap(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per-label AP with labels sharded over ranks: label j belongs to rank j % world."""
    rank, world = dist.get_rank(), dist.get_world_size()
    num_labels = scores.shape[1]
    mine = None
    for owner in range(world):
        cols = np.arange(owner, num_labels, world)
        received = [None] * world if rank == owner else None
        dist.gather_object((scores[:, cols], labels[:, cols]), received, dst=owner)
        if rank == owner:
            mine = (np.concatenate([s for s, _ in received]), np.concatenate([y for _, y in received]))
    my_ap = per_label_ap(*mine)
    gathered = [None] * world
    dist.all_gather_object(gathered, my_ap)
    ap = np.empty(num_labels)
    for owner, values in enumerate(gathered):
        ap[owner::world] = values
    return ap


def evaluate_settings(scores: np.ndarray, labels: np.ndarray, settings: dict[str, np.ndarray], ks,
                      device: torch.device | str = "cpu") -> dict[str, dict[str, float]]:
    """Metrics for each setting (a name -> column indices), over all workers if distributed.

    AP is per label, so it is computed once for every column and each setting takes its own;
    top-K depends on the label set and is counted per setting.
    """
    scores = np.asarray(scores, dtype=np.float64)
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    ap = _distributed_ap(scores, labels) if distributed else per_label_ap(scores, labels)
    results = {}
    for name, cols in settings.items():
        counts = _local_counts(scores[:, cols], labels[:, cols], ks)
        if distributed:
            total = torch.from_numpy(counts).to(device)
            dist.all_reduce(total)
            counts = total.cpu().numpy()
        results[name] = _summarise(counts, ap[cols], ks, len(cols))
    return results
