"""`lesa compare`: LESA and the baselines of its tables, trained on the same data, budget and seed.

Each model is one ordinary `lesa train` run (launch/driver.run_training) into DIR/<name>, its
MLflow run nested under one parent run of the comparison. The results become one table in the
paper's format (docs/protocol.md, The paper's numbers): rows are methods, columns P/R/F1 at each K and mAP, for ZSL and
GZSL; DIR/table.md for people, DIR/table.json for scripts. A model that fails is a row saying
why, and the others still run. A model that trains nothing (clip_zeroshot, the CLIP floor) is one
`lesa evaluate` run instead (launch/driver.run_evaluation), its row the same shape.

With several seeds (`run_seeds`) each seed is such a comparison in DIR/seed<S>, and DIR/table.md
is the mean of every cell over the seeds, followed by the per-seed values of the numbers the
paper's claims rest on (mAP, F1 at the smaller K): an ordering a seed's noise decides shows there.
"""

from __future__ import annotations

import json
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from launch.preflight import check_registries
from trainer.config import Config, ConfigError, load_config

TITLES = {
    "lesa": "LESA",
    "fast0tag": "Fast0Tag",
    "labelem": "LabelEM",
    "conse": "CONSE",
    "one_attention_per_label": "One Attention per Label",
    "clip_zeroshot": "CLIP zero-shot (no training)",
}
PAPER_ORDER = ["conse", "labelem", "fast0tag", "one_attention_per_label", "lesa"]


@dataclass
class Variant:
    name: str  # folder under DIR and MLflow run name
    title: str  # row of the table
    overrides: list[str] = field(default_factory=list)


def model_variants(models: list[str], num_attentions: int) -> list[Variant]:
    return [
        Variant(m, TITLES.get(m, m) + (f" (M={num_attentions})" if m == "lesa" else ""), [f"model.name={m}"])
        for m in models
    ]


# LESA's ablations: one loss term off, or fewer shared attentions.
ABLATIONS = [
    Variant("lesa_no_dist", "LESA without L_dist", ["model.name=lesa", "loss.dist=0"]),
    Variant("lesa_no_rel", "LESA without L_rel", ["model.name=lesa", "loss.rel=0"]),
    Variant("lesa_no_div", "LESA without L_div", ["model.name=lesa", "loss.div=0"]),
    Variant("lesa_m1", "LESA (M=1)", ["model.name=lesa", "model.num_attentions=1"]),
    Variant("lesa_m5", "LESA (M=5)", ["model.name=lesa", "model.num_attentions=5"]),
]


def failure_reason(exc: BaseException) -> str:
    """One line: Ray wraps a worker's error in its traceback, whose last line names the cause."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    cause = lines[-1] if lines else ""
    reason = f"{type(exc).__name__}: {cause}" if cause else type(exc).__name__
    return reason if len(reason) <= 300 else reason[:297] + "..."


def run_compare(config: str, variants: list[Variant], out: str | Path, overrides: list[str] = ()) -> dict:
    """Train every variant in turn; write DIR/table.md and DIR/table.json; return the table."""
    out = Path(out).resolve()
    configs = {
        v.name: load_config(config, [*overrides, *v.overrides, f"mlflow.run_name={v.name}"]) for v in variants
    }  # every config checked before anything trains
    for cfg in configs.values():
        check_registries(cfg)
    refuse_used_folders(out, variants)
    out.mkdir(parents=True, exist_ok=True)
    base = load_config(config, list(overrides))
    parent, tracking_uri = open_parent_run(config, base, list(configs))
    rows = [train_variant(v, configs[v.name], out, parent) for v in variants]
    table = {
        "config": str(config),
        "overrides": list(overrides),
        "k": base.eval.k,
        "data": base.data.url,
        "steps": base.train.max_steps,
        "seed": base.train.seed,
        "workers": base.scaling.num_workers,
        "date": time.strftime("%Y-%m-%d"),
        "mlflow_parent_run_id": parent.run_id,
        "tracking_uri": tracking_uri,
        "rows": rows,
    }
    (out / "table.json").write_text(json.dumps(table, indent=1))
    (out / "table.md").write_text(format_table_md(table))
    for name in ("table.md", "table.json"):
        parent.artifact(out / name)
    parent.finish(ok=any(row["status"] == "ok" for row in rows))
    print("\n" + (out / "table.md").read_text() + f"\nresults in {out} (table.md, table.json, one folder per model)")
    return table


def open_parent_run(config: str, base: Config, names: list[str]):
    """(the MLflow run every variant's run is nested under, its tracking URI)."""
    from trainer.tracking import RunLogger, open_run, resolve_tracking

    tracking_uri, artifact_location = resolve_tracking(base.mlflow)
    parent_name = base.mlflow.run_name or f"compare-{time.strftime('%Y%m%d-%H%M%S')}"
    params = {"compare.config": config, "compare.variants": " ".join(names), **base.flat()}
    run_id = open_run(tracking_uri, artifact_location, base.mlflow.experiment, parent_name, params)
    print(f"MLflow parent run {run_id} ({parent_name}) in {tracking_uri}; {len(names)} models: {', '.join(names)}",
          flush=True)  # fmt: skip
    return RunLogger(tracking_uri, run_id), tracking_uri


def train_variant(v: Variant, cfg: Config, out: Path, parent) -> dict:
    """One row of the table: the variant trained in OUT/<name>, or why it failed (the next one still runs)."""
    from launch.driver import run_evaluation, run_training
    from trainer.models.registry import MODELS
    from trainer.results import flat_eval_metrics

    print(f"\n##### lesa compare: {v.title} ({v.name}) #####", flush=True)
    row = {"name": v.name, "title": v.title, "overrides": v.overrides, "out": str(out / v.name)}
    try:
        if MODELS[cfg.model.name].trains:
            metrics = run_training(cfg, out / v.name, parent_run_id=parent.run_id)
        else:
            metrics = run_evaluation(cfg, None, out / v.name, parent_run_id=parent.run_id)
    except Exception as exc:  # reported in the table; the next model still runs
        traceback.print_exc()
        row.update(status="failed", reason=failure_reason(exc))
        print(f"##### {v.name} failed: {row['reason']}", flush=True)
        return row
    keep = ("zsl", "gzsl", "chance_mAP", "step", "num_test_images", "mlflow_run_id")
    row.update(status="ok", **{k: metrics[k] for k in keep})
    parent.log({f"{v.name}/{k}": value for k, value in flat_eval_metrics(metrics).items()}, metrics["step"])
    return row


def refuse_used_folders(out: Path, variants: list[Variant]) -> None:
    for v in variants:
        if (out / v.name / "run.json").exists():
            raise ConfigError(f"--out {out}: {v.name}/ already holds a training run; choose another --out")


def run_seeds(config: str, variants: list[Variant], out: str | Path, overrides: list[str], seeds: list[int]) -> dict:
    """One comparison per seed (train.seed) into DIR/seed<S>; DIR/table.md and DIR/table.json hold
    the mean over the seeds of every cell, and the per-seed values. Returns the mean table."""
    out = Path(out).resolve()
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds {' '.join(map(str, seeds))}: a seed is repeated")
    for seed in seeds:  # every folder checked before the first seed trains
        refuse_used_folders(out / f"seed{seed}", variants)
    run_name = load_config(config, list(overrides)).mlflow.run_name or f"compare-{time.strftime('%Y%m%d-%H%M%S')}"
    tables = []
    for seed in seeds:
        print(f"\n########## lesa compare: seed {seed} ({len(tables) + 1} of {len(seeds)}) ##########", flush=True)
        tables.append(
            run_compare(
                config,
                variants,
                out / f"seed{seed}",
                [*overrides, f"train.seed={seed}", f"mlflow.run_name={run_name}-seed{seed}"],
            )
        )
    table = mean_over_seeds(tables, seeds)
    (out / "table.json").write_text(json.dumps(table, indent=1))
    (out / "table.md").write_text(format_table_md(table) + "\n" + format_per_seed_md(table))
    print("\n" + (out / "table.md").read_text() + f"\nresults in {out} (table.md, table.json, one folder per seed)")
    return table


def mean_over_seeds(tables: list[dict], seeds: list[int]) -> dict:
    """The seeds' tables as one: each cell the mean over seeds; a row failed at any seed is failed."""
    rows = []
    for i, row in enumerate(tables[0]["rows"]):
        per_seed = [table["rows"][i] for table in tables]
        failed = [(seed, r) for seed, r in zip(seeds, per_seed) if r["status"] != "ok"]
        mean = {key: row[key] for key in ("name", "title", "overrides")}
        if failed:
            seed, r = failed[0]
            rows.append({**mean, "status": "failed", "reason": f"seed {seed}: {r['reason']}"})
            continue
        for setting in ("zsl", "gzsl"):
            mean[setting] = {m: sum(r[setting][m] for r in per_seed) / len(per_seed) for m in row[setting]}
            mean[f"{setting}_per_seed"] = [r[setting] for r in per_seed]
        rows.append(
            {
                **mean,
                "status": "ok",
                "chance_mAP": row["chance_mAP"],
                "step": row["step"],
                "num_test_images": row["num_test_images"],
                "mlflow_run_ids": [r["mlflow_run_id"] for r in per_seed],
            }
        )
    return {
        **{k: v for k, v in tables[0].items() if k not in ("rows", "seed", "mlflow_parent_run_id")},
        "seeds": list(seeds),
        "mlflow_parent_run_ids": [t["mlflow_parent_run_id"] for t in tables],
        "rows": rows,
    }


def format_per_seed_md(table: dict) -> str:
    k = table["k"][0]
    columns = [("zsl", "mAP"), ("zsl", f"F1@{k}"), ("gzsl", "mAP"), ("gzsl", f"F1@{k}")]
    seeds = " / ".join(str(s) for s in table["seeds"])
    header = ["method", *(f"{setting.upper()} {metric}, seeds {seeds}" for setting, metric in columns)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in table["rows"]:
        if row["status"] == "ok":
            cells = [" / ".join(f"{r[metric]:.1f}" for r in row[f"{setting}_per_seed"]) for setting, metric in columns]
            lines.append("| " + " | ".join([row["title"], *cells]) + " |")
    return "Per seed:\n\n" + "\n".join(lines) + "\n"


def prf(metrics: dict, k: int) -> str:
    return "/".join(f"{metrics[f'{m}@{k}']:.1f}" for m in ("P", "R", "F1"))


def format_table_md(table: dict) -> str:
    """The paper's layout: P/R/F1 at each K, then mAP, for ZSL and then GZSL (percent)."""
    ks = table["k"]
    header = ["method", *(f"ZSL K={k}" for k in ks), "ZSL mAP", *(f"GZSL K={k}" for k in ks), "GZSL mAP"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    ok = [row for row in table["rows"] if row["status"] == "ok"]
    for row in table["rows"]:
        if row["status"] != "ok":
            reason = row["reason"].replace("|", "\\|")
            cells = [f"{row['title']}: **failed**: {reason}", *["—"] * (len(header) - 1)]
        else:
            cells = [row["title"]]
            for setting in ("zsl", "gzsl"):
                cells += [prf(row[setting], k) for k in ks] + [f"{row[setting]['mAP']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    seeds = f"mean over seeds {', '.join(map(str, table['seeds']))}" if "seeds" in table else f"seed {table['seed']}"
    notes = [
        f"P/R/F1 at K and mAP in percent, {table['steps']} steps on {table['workers']} workers, "
        f"{seeds}, data {table['data']}."
    ]
    if ok:
        chance = ok[0]["chance_mAP"]
        notes.append(
            f"{ok[0]['num_test_images']} test images; chance mAP (mean label frequency): "
            f"ZSL {chance['zsl']:.1f}, GZSL {chance['gzsl']:.1f}."
        )
    return "\n".join(lines) + "\n\n" + " ".join(notes) + "\n"
