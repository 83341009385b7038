"""Console output: a progress line per logging step, progress while a split is scored, the metric table."""

from __future__ import annotations

import time

from datasets.progress import format_duration


class Progress:
    def __init__(self, total_steps: int, samples_per_step: int, first_step: int = 0):
        self.total, self.samples_per_step = total_steps, samples_per_step
        self.start = time.time()
        self.first = self.step = first_step
        self.data_wait: list[float] = []
        self.window_start: tuple[int, float] | None = None

    def update(self, step: int, row: dict[str, float]) -> None:
        self.step = step
        if self.window_start is None:  # throughput counts from the first window on: no start-up
            self.window_start = (step, time.time())
        self.data_wait.append(row["data_wait_fraction"])
        elapsed = time.time() - self.start
        eta = elapsed / max(step - self.first, 1) * (self.total - step)
        losses = " ".join(f"{k.split('/')[-1]}={v:.4g}" for k, v in row.items() if k.startswith("loss/"))
        print(
            # the total is the weighted sum of the terms; each term shows (and MLflow's loss/* hold it) unweighted
            f"step {step}/{self.total} loss {row['loss']:.4f} (unweighted terms: {losses}) "
            f"{row['samples_per_s']:.0f} samples/s data-wait {100 * row['data_wait_fraction']:.0f}% "
            f"elapsed {format_duration(elapsed)} ETA {format_duration(eta)}",
            flush=True,
        )

    def summary(self) -> dict[str, float]:
        """Steps and time of the whole run; samples/s from the end of the first logging window."""
        elapsed = time.time() - self.start
        first_step, first_time = self.window_start or (self.first, self.start)
        steady = (
            (self.step - first_step) / max(time.time() - first_time, 1e-9)
            if self.step > first_step
            else (self.step - self.first) / max(elapsed, 1e-9)
        )
        return {
            "steps": self.step - self.first,
            "seconds": elapsed,
            "samples_per_s": steady * self.samples_per_step,
            "data_wait_fraction": sum(self.data_wait) / max(len(self.data_wait), 1),
        }


SCORING_EVERY_S = 30.0


class ScoringProgress:
    """While a worker scores its share of a split: a line every SCORING_EVERY_S seconds and one
    at the end, with images done, rate and ETA (Open Images' 125k test images take a while)."""

    def __init__(self, split: str, total: int, enabled: bool):
        self.split, self.total, self.enabled, self.every = split, total, enabled, SCORING_EVERY_S
        self.done, self.start = 0, time.time()
        self.last = self.start

    def update(self, images: int) -> None:
        self.done += images
        now = time.time()
        if self.enabled and now - self.last >= self.every:
            self.last = now
            rate = self.done / max(now - self.start, 1e-9)
            print(
                f"scoring {self.split}: {self.done}/{self.total} images of this worker, {rate:.0f} images/s, "
                f"ETA {format_duration((self.total - self.done) / max(rate, 1e-9))}",
                flush=True,
            )

    def finish(self) -> None:
        if self.enabled:
            elapsed = time.time() - self.start
            print(
                f"scored {self.split}: {self.done} images of this worker in {format_duration(elapsed)} "
                f"({self.done / max(elapsed, 1e-9):.0f} images/s)",
                flush=True,
            )


def format_table(metrics: dict, ks) -> str:
    """ZSL and GZSL rows: P/R/F1 at each K, then mAP, in percent."""
    head = ["setting"] + [f"{m}@{k}" for k in ks for m in ("P", "R", "F1")] + ["mAP"]
    rows = [
        [name.upper()] + [f"{metrics[name][col]:.2f}" for col in head[1:]]
        for name in ("zsl", "gzsl")
        if name in metrics
    ]
    widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
    line = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(r) for r in rows])
