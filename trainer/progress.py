"""Console output: a progress line per logging step and the metric table."""

from __future__ import annotations

import time


def format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    def __init__(self, total_steps: int, samples_per_step: int, first_step: int = 0):
        self.total, self.samples_per_step = total_steps, samples_per_step
        self.start = time.time()
        self.first = self.step = first_step

    def update(self, step: int, row: dict[str, float]) -> None:
        self.step = step
        elapsed = time.time() - self.start
        eta = elapsed / max(step - self.first, 1) * (self.total - step)
        losses = " ".join(f"{k.split('/')[-1]}={v:.4g}" for k, v in row.items() if k.startswith("loss/"))
        print(f"step {step}/{self.total} loss {row['loss']:.4f} ({losses}) "
              f"{row['samples_per_s']:.0f} samples/s data-wait {100 * row['data_wait_fraction']:.0f}% "
              f"elapsed {format_duration(elapsed)} ETA {format_duration(eta)}", flush=True)

    def summary(self) -> dict[str, float]:
        elapsed = time.time() - self.start
        return {"steps": self.step - self.first, "seconds": elapsed,
                "samples_per_s": (self.step - self.first) * self.samples_per_step / max(elapsed, 1e-9)}


def format_table(metrics: dict, ks) -> str:
    """ZSL and GZSL rows: P/R/F1 at each K, then mAP, in percent."""
    head = ["setting"] + [f"{m}@{k}" for k in ks for m in ("P", "R", "F1")] + ["mAP"]
    rows = [[name.upper()] + [f"{metrics[name][col]:.2f}" for col in head[1:]]
            for name in ("zsl", "gzsl") if name in metrics]
    widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
    line = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(r) for r in rows])
