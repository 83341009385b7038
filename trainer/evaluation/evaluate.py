"""Evaluation inside the workers: every worker scores a disjoint share of the test shards, then the
metrics are combined exactly (trainer/evaluation/metrics.py). ZSL scores the unseen labels, GZSL all labels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from datasets.contract import DatasetInfo
from datasets.stream import StreamSpec, make_loader, split_by_rank
from trainer.bad_samples import BadSampleLog
from trainer.config import Config
from trainer.distributed import distributed
from trainer.evaluation.metrics import Annotations, LabelStats, StreamingMetrics
from trainer.models.backbones import input_resample
from trainer.progress import ScoringProgress


def average_buffers(model: torch.nn.Module) -> None:
    """Average BatchNorm running statistics over workers, so that every worker scores with the
    same model (data parallelism keeps the weights equal, but each worker's BN saw other data)."""
    if not distributed():
        return
    for buf in model.buffers():
        if buf.is_floating_point():
            dist.all_reduce(buf)
            buf.div_(dist.get_world_size())


def settings_of(info: DatasetInfo) -> dict[str, np.ndarray]:
    return {"zsl": info.unseen, "gzsl": np.arange(info.num_labels)}


@torch.no_grad()
def score_split(
    model,
    info: DatasetInfo,
    split: str,
    cfg: Config,
    rank: int,
    world: int,
    device,
    bad: BadSampleLog,
    metrics: StreamingMetrics,
    label_ids: np.ndarray | None = None,
) -> None:
    """Scores this worker's share of `split`, for all labels or only `label_ids` (columns then in
    that order), batch by batch into `metrics`, on the model's device."""
    shards = info.shards(split)
    spec = StreamSpec(
        shards=shards,
        num_labels=info.num_labels,
        image_size=cfg.data.image_size,
        batch_size=cfg.eval.batch_size,
        rank=rank,
        world=world,
        train=False,
        features=info.features,
        resample=input_resample(cfg.model),
    )
    mine = split_by_rank(shards, rank, world)  # the reader's own split
    loader = make_loader(spec, min(cfg.data.loader_workers, len(mine)), pin_memory=device.type == "cuda")
    if label_ids is None:
        label_ids = np.arange(info.num_labels)
    ids = torch.as_tensor(label_ids, device=device)
    progress = ScoringProgress(split, sum(s.samples for s in mine), enabled=rank == 0)
    for batch in loader:
        bad.add(batch)
        if batch.has_samples:
            out = model(batch.images.to(device, non_blocking=True), ids)
            metrics.add(out.scores, Annotations.from_dense(batch.labels.numpy()[:, label_ids]))
            progress.update(len(batch.keys))
    progress.finish()


def chance_map(stats: LabelStats, settings: dict[str, np.ndarray]) -> dict[str, float]:
    """The mAP of random scores: per label, positives / annotated images, averaged (percent)."""
    freq = stats.positives / np.maximum(stats.annotated, 1)
    return {name: 100 * float(freq[cols].mean()) for name, cols in settings.items()}


@dataclass
class EvalResult:
    """One evaluation of a split over all workers: what metrics.json, MLflow and the per-label TSVs
    show. `zsl`/`gzsl`: {"P@3": .., "R@3": .., "F1@3": .., ..., "mAP": ..} in percent."""

    zsl: dict[str, float]
    gzsl: dict[str, float]
    chance_map: dict[str, float]  # {"zsl": .., "gzsl": ..}: the mAP of random scores
    per_label: LabelStats
    bad_samples: dict  # BadSampleLog.summary() of the split

    @property
    def num_images(self) -> int:
        return self.bad_samples["read"] - self.bad_samples["count"]

    def settings(self) -> dict[str, dict[str, float]]:
        return {"zsl": self.zsl, "gzsl": self.gzsl}


def evaluate(
    model, info: DatasetInfo, cfg: Config, rank: int, world: int, device, average_bn: bool = True
) -> EvalResult:
    """ZSL and GZSL metrics of `eval.split` over all workers.

    A collective: every rank must call it, with or without samples of its own."""
    if average_bn:  # after training; a loaded checkpoint is the same on every worker already
        average_buffers(model)
    was_training = model.training
    model.eval()
    bad = BadSampleLog(rank)
    settings = settings_of(info)
    metrics = StreamingMetrics(settings, info.num_labels, cfg.eval.k)
    score_split(model, info, cfg.eval.split, cfg, rank, world, device, bad, metrics)
    model.train(was_training)
    results, stats = metrics.result(device)  # a worker with no samples still joins the collectives
    return EvalResult(results["zsl"], results["gzsl"], chance_map(stats, settings), stats, bad.summary())


def validation_metric(
    model, info: DatasetInfo, cfg: Config, rank: int, world: int, device, average_bn: bool = True
) -> float:
    """`eval.val_metric` over the seen labels of `eval.val_split` (docs/protocol.md, Optimisation: validation uses
    seen labels only), computed exactly over all workers; rank 0's value on every rank, so the
    schedule's decisions (trainer/schedule.py) cannot differ between ranks. A collective."""
    from trainer.schedule import metric_k

    if average_bn:
        average_buffers(model)
    was_training = model.training
    model.eval()
    k = metric_k(cfg.eval.val_metric)
    metrics = StreamingMetrics({"seen": np.arange(len(info.seen))}, len(info.seen), [k or 1])
    score_split(
        model, info, cfg.eval.val_split, cfg, rank, world, device, BadSampleLog(rank), metrics, label_ids=info.seen
    )
    model.train(was_training)
    results, _ = metrics.result(device)
    value = torch.tensor(results["seen"][cfg.eval.val_metric], dtype=torch.float64, device=device)
    if distributed():
        dist.broadcast(value, src=0)
    return float(value)
