"""The driver of `lesa extract`: a frozen backbone over an image dataset, distributed with Ray.

    lesa extract CONFIG --out URL [--splits train val test] [--set key=value ...]

`scaling.num_workers` Ray actors (a GPU each with `scaling.use_gpu`) each load the backbone once;
shards are handed to whichever actor is free, one at a time, so a slow shard delays nobody. The
per-shard work is datasets/makers/features.py. The driver plans (shards with a record of the same
backbone, weights and image size are done already), prints progress per finished shard, and at
the end writes the feature root's metadata and `extract/report.json` (bad images by kind).
"""

from __future__ import annotations

import time
from collections import Counter
from functools import partial

from datasets.contract import DatasetError, DatasetInfo, FeatureSpec, join, write_metadata
from datasets.makers.features import (
    RECORDS_DIR,
    ExtractSettings,
    ShardExtractor,
    read_record,
    record_url,
    relative_path,
    same_source,
    write_json,
)
from launch.preflight import preflight_extract
from launch.storage import storage_env
from launch.workers import start_ray
from trainer.config import Config, ConfigError
from trainer.progress import format_duration

EXAMPLES_PRINTED = 20


def plan(cfg: Config, info: DatasetInfo, out: str, splits: list[str]) -> tuple[list[dict], list[dict]]:
    """(jobs still to do, records of the shards already done) over `splits`."""
    todo, done = [], []
    for split in splits:
        for shard in info.shards(split):
            relpath = relative_path(info.root, shard)
            job = {
                "split": split,
                "relpath": relpath,
                "source": shard.url,
                "samples": shard.samples,
                "num_labels": info.num_labels,
                "out": join(out, relpath),
                "record": record_url(out, relpath),
            }
            record = read_record(job["record"])
            if record is None:
                todo.append(job)
            elif not same_source(
                record["made_with"], cfg.model.backbone, cfg.model.backbone_weights, cfg.data.image_size
            ):
                raise ConfigError(
                    f"--out {out}: {job['record']} holds features made with {record['made_with']}, "
                    f"not model.backbone={cfg.model.backbone} at data.image_size="
                    f"{cfg.data.image_size} with these weights; choose another --out"
                )
            else:
                done.append(record)
    return todo, done


def extractor_args(cfg: Config, precision: str = "fp32") -> tuple:
    """What each ShardExtractor actor is made with: how to build the config's backbone, and the
    settings it reads (datasets/ takes plain values, not a Config)."""
    from trainer.models.backbones import build_backbone, input_resample

    settings = ExtractSettings(
        backbone=cfg.model.backbone,
        weights=cfg.model.backbone_weights,
        image_size=cfg.data.image_size,
        batch_size=cfg.eval.batch_size,
        loader_workers=cfg.data.loader_workers,
        use_gpu=cfg.scaling.use_gpu,
        cpus_per_worker=cfg.scaling.cpus_per_worker,
        compile=cfg.model.compile,
        precision=precision,
        resample=input_resample(cfg.model),
    )
    return partial(build_backbone, cfg.model), settings


def extract_on_ray(cfg: Config, todo: list[dict], precision: str, log=print) -> tuple[list[dict], float]:
    """Run the jobs on min(num_workers, jobs) actors; records come back as shards finish. Returns
    them and the seconds the extraction took once the actors had loaded the backbone."""
    import ray
    from ray.util import ActorPool

    start_ray(cfg)
    actor = ray.remote(ShardExtractor).options(
        num_cpus=cfg.scaling.cpus_per_worker,
        num_gpus=1 if cfg.scaling.use_gpu else 0,
        # A dead actor (OOM, a lost node) restarts and redoes its shard: writing one is idempotent.
        max_restarts=cfg.checkpoint.max_failures,
        max_task_retries=cfg.checkpoint.max_failures,
        runtime_env={"env_vars": {"RAY_USAGE_STATS_ENABLED": "0", **storage_env()}},
    )
    actors = [actor.remote(*extractor_args(cfg, precision)) for _ in range(min(cfg.scaling.num_workers, len(todo)))]
    ray.get([a.made_with.remote() for a in actors])  # loaded: the rate below is the extraction's alone
    log(f"extract: {len(todo)} shards on {len(actors)} {'GPU' if cfg.scaling.use_gpu else 'CPU'} workers")
    total = sum(job["samples"] for job in todo)
    start, images, records = time.time(), 0, []
    for record in ActorPool(actors).map_unordered(lambda a, job: a.extract.remote(job), todo):
        records.append(record)
        images += record["read"]
        elapsed = time.time() - start
        rate = images / max(elapsed, 1e-9)
        log(
            f"extract: {len(records)}/{len(todo)} shards, {images}/{total} images, {rate:.0f} images/s, "
            f"elapsed {format_duration(elapsed)} ETA {format_duration((total - images) / max(rate, 1e-9))} "
            f"({record['shard']}: {record['samples']} written, {len(record['skipped'])} skipped)"
        )
    seconds = time.time() - start
    for a in actors:
        ray.kill(a)
    return records, seconds


def feature_spec(records: list[dict], out: str) -> FeatureSpec:
    if not records:
        raise DatasetError(f"{out}: no shard extracted (the source splits hold no shards)")
    specs = {json_key(r["made_with"]) for r in records}
    if len(specs) != 1:
        raise DatasetError(f"{out}/{RECORDS_DIR}: shards were made with different features: {sorted(specs)}")
    return FeatureSpec.from_json(records[0]["made_with"], f"{out}/{RECORDS_DIR}")


def json_key(value: dict) -> str:
    return ",".join(f"{k}={value[k]}" for k in sorted(value))


def summarise(records: list[dict], splits: list[str]) -> dict:
    per_split = {}
    for split in splits:
        mine = [r for r in records if r["split"] == split]
        kinds = Counter(s["kind"] for r in mine for s in r["skipped"])
        per_split[split] = {
            "shards": len(mine),
            "samples": sum(r["samples"] for r in mine),
            "read": sum(r["read"] for r in mine),
            "skipped": sum(kinds.values()),
            "by_kind": dict(kinds),
        }
    examples = [{"shard": r["source"], **s} for r in records for s in r["skipped"]][:EXAMPLES_PRINTED]
    return {"splits": per_split, "skipped": sum(s["skipped"] for s in per_split.values()), "examples": examples}


def run_extract(cfg: Config, out: str, splits: list[str] | None = None, precision: str = "fp32", log=print) -> dict:
    """Extract, then write OUT's metadata: every split of the source whose shards are all done
    (also by earlier runs with other --splits) is listed; shards left with no sample are not.
    `precision` bf16 or fp16 runs the backbone under autocast (features are stored float16 anyway)."""
    cfg, out, info, splits = preflight_extract(cfg, out, splits)
    todo, reused = plan(cfg, info, out, splits)
    log(
        f"extract {cfg.data.url} -> {out}: {cfg.model.backbone} at {cfg.data.image_size} px, splits "
        f"{', '.join(splits)}; {len(reused)} shards done already, {len(todo)} to do"
    )
    start = time.time()
    fresh, extracting = extract_on_ray(cfg, todo, precision, log) if todo else ([], 0.0)

    listed, records = {}, []
    for split in info.splits:  # all of the source's splits: earlier runs may have done others
        mine = [read_record(record_url(out, relative_path(info.root, s))) for s in info.shards(split)]
        if all(r is not None for r in mine):
            listed[split] = [(r["shard"], r["samples"]) for r in mine if r["samples"] > 0]
            records += mine
    spec = feature_spec(records, out)
    write_metadata(
        out,
        name=f"{info.name}-{spec.backbone}-features",
        kind="feature",
        labels=info.labels,
        embeddings=info.embeddings,
        splits=listed,
        extra={"features": spec.to_json(), "source": cfg.data.url},
    )

    seconds = time.time() - start
    images = sum(r["read"] for r in fresh)
    report = {
        "source": cfg.data.url,
        "out": out,
        "features": spec.to_json(),
        "shards_extracted": len(fresh),
        "shards_reused": len(reused),
        "seconds": round(seconds, 2),
        # the rate of the extraction itself: Ray and the actors' start-up are not in it
        "images_per_s": round(images / max(extracting, 1e-9), 1) if fresh else None,
        **summarise(records, list(listed)),
    }
    write_json(join(out, RECORDS_DIR, "report.json"), report)
    for e in report["examples"]:
        log(
            f"skipped bad sample: shard {e['shard']} key {e['key']}: {e['kind']}"
            + (f" ({e['detail']})" if e["detail"] else "")
        )
    log(
        f"wrote {out}: {spec.shape[0]} x {spec.channels} float16 features per image "
        f"({spec.grid[0]}x{spec.grid[1]} regions); "
        + ", ".join(f"{s} {v['samples']} images ({v['skipped']} bad skipped)" for s, v in report["splits"].items())
        + f"; {len(fresh)} shards extracted, {len(reused)} reused in {format_duration(seconds)}; "
        f"report {join(out, RECORDS_DIR, 'report.json')}"
    )
    return report
