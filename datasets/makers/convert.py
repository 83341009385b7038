"""What every image converter shares: a shard plan, image re-encoding, one Ray task per output
shard, resumable reruns, and the conversion report.

A converter (openimages.py, nuswide.py) turns its annotation files into a `ShardPlan` per split:
the ordered sample keys, image URLs and encoded `labels.json` of each output shard. `run_shards`
writes the shards as Ray tasks (the cluster in RAY_ADDRESS, else a local one), each to a temporary
name renamed when complete, followed by a marker `_convert/{split}-NNNNNN.json` holding the
shard's sample count, what was skipped, and a fingerprint of its inputs. A rerun skips every shard
whose marker matches, so an interrupted conversion resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
import uuid
from dataclasses import dataclass, field

import fsspec
from PIL import Image

from datasets.contract import join
from datasets.images import CONVERT_FORMATS, decode_rgb
from datasets.progress import format_duration
from datasets.ray_start import connect_or_start_ray

MARKER_DIR = "_convert"
EXAMPLES = 10  # examples of each kind of skipped image kept in the report


@dataclass(frozen=True)
class ImageOptions:
    short_side: int = 256  # resize so the short side is this, never upscaling
    quality: int = 90  # JPEG quality of the re-encoded image
    min_bytes: int = 0  # files of at most this many bytes are skipped (NUS-WIDE: 4000)
    placeholder_sha256: str = ""  # files with these bytes are skipped (Flickr's "photo unavailable")


@dataclass
class ShardJob:
    split: str
    index: int
    keys: list[str]
    image_urls: list[str]
    labels: list[bytes]  # encoded labels.json, one per key

    @property
    def relpath(self) -> str:
        return f"{self.split}/{self.split}-{self.index:06d}.tar"

    def fingerprint(self, options: ImageOptions) -> str:
        h = hashlib.sha256(repr(options).encode())
        for key, url, labels in zip(self.keys, self.image_urls, self.labels):
            h.update(b"\0".join([key.encode(), url.encode(), labels, b"\n"]))
        return h.hexdigest()


@dataclass
class SplitReport:
    """Counts for one split; `skipped` maps a kind (missing, unreadable, ...) to count + examples."""

    planned: int = 0
    written: int = 0
    shards: int = 0
    shards_reused: int = 0
    skipped: dict = field(default_factory=dict)

    def add_skipped(self, kind: str, count: int, examples: list) -> None:
        entry = self.skipped.setdefault(kind, {"count": 0, "examples": []})
        entry["count"] += count
        entry["examples"].extend(examples[: EXAMPLES - len(entry["examples"])])


def reencode_image(data: bytes, options: ImageOptions) -> bytes:
    """Decode (`decode_rgb`: upright, 8-bit RGB), shrink the short side to `options.short_side`,
    JPEG-encode. Only CONVERT_FORMATS are decoded, and only up to the pixel limit of
    datasets/images.py once a JPEG's draft has cut what it decodes (a 100-megapixel photo decodes at
    1/8 of its side; measured 22 vs 32-66 ms per 1024x768 Open Images-sized photo)."""
    im = decode_rgb(data, CONVERT_FORMATS, short_side=options.short_side)
    w, h = im.size
    scale = options.short_side / min(w, h)
    if scale < 1:
        im = im.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=options.quality)
    return buf.getvalue()


def write_shard(job: ShardJob, out: str, options: ImageOptions, fingerprint: str) -> dict:
    """Write one shard (runs as a Ray task). Returns and stores its marker: samples and skips."""
    import webdataset as wds

    skipped: dict[str, list] = {"missing": [], "unreadable": [], "too_small": [], "placeholder": []}
    final = join(out, job.relpath)
    tmp = f"{final}.tmp-{uuid.uuid4().hex[:8]}"
    fs, _ = fsspec.core.url_to_fs(final)
    samples = 0
    with fsspec.open(tmp, "wb") as f:
        tar = wds.TarWriter(f)
        for key, url, labels in zip(job.keys, job.image_urls, job.labels):
            try:
                with fsspec.open(url, "rb") as img:
                    data = img.read()
            except (FileNotFoundError, IsADirectoryError):
                skipped["missing"].append(key)
                continue
            except OSError as exc:
                skipped["unreadable"].append([key, f"read failed: {exc}"])
                continue
            if len(data) <= options.min_bytes:
                skipped["too_small"].append(key)
                continue
            if options.placeholder_sha256 and hashlib.sha256(data).hexdigest() == options.placeholder_sha256:
                skipped["placeholder"].append(key)
                continue
            try:
                jpg = reencode_image(data, options)
            except Exception as exc:  # any decoder failure: the image is skipped and reported
                skipped["unreadable"].append([key, f"{type(exc).__name__}: {exc}"[:200]])
                continue
            tar.write({"__key__": key, "jpg": jpg, "labels.json": labels})
            samples += 1
        tar.close()
    fs.mv(fsspec.core.url_to_fs(tmp)[1], fsspec.core.url_to_fs(final)[1])
    marker = {
        "path": job.relpath,
        "samples": samples,
        "planned": len(job.keys),
        "fingerprint": fingerprint,
        "skipped": skipped,
    }
    with fsspec.open(join(out, MARKER_DIR, f"{job.split}-{job.index:06d}.json"), "w") as f:
        json.dump(marker, f)
    return marker


def read_markers(out: str) -> dict[str, dict]:
    """Markers of shards finished by an earlier run, by shard name (`train-000012`)."""
    fs, path = fsspec.core.url_to_fs(join(out, MARKER_DIR))
    if not fs.exists(path):
        return {}
    markers = {}
    for name in fs.ls(path, detail=False):
        if name.endswith(".json"):
            try:
                with fs.open(name, "r") as f:
                    markers[os.path.basename(name)[:-5]] = json.load(f)
            except (OSError, json.JSONDecodeError):
                pass  # a marker cut short by a crash: the shard is simply written again
    return markers


def say(message: str) -> None:
    print(message, flush=True)


def _prepare_output(out: str, splits) -> dict[str, dict]:
    """Create each split's folder and the marker folder; return the markers an earlier run left."""
    for split in splits:
        fs, path = fsspec.core.url_to_fs(join(out, split))
        fs.makedirs(path, exist_ok=True)
    fs, path = fsspec.core.url_to_fs(join(out, MARKER_DIR))
    fs.makedirs(path, exist_ok=True)
    return read_markers(out)


def _reusable(job: ShardJob, fingerprint: str, markers: dict[str, dict], out: str) -> dict | None:
    """The marker an earlier run left for `job`'s shard, when its inputs match and the shard exists."""
    old = markers.get(f"{job.split}-{job.index:06d}")
    fs, path = fsspec.core.url_to_fs(join(out, job.relpath))
    if old and old.get("fingerprint") == fingerprint and fs.exists(path):
        return old
    return None


class _Tally:
    """The finished shards: their markers, the split reports' counts, and the progress line
    (every `every` seconds, and once at the end)."""

    def __init__(self, report: dict[str, SplitReport], num_jobs: int, log, every: float):
        self.report, self.num_jobs, self.log, self.every = report, num_jobs, log, every
        self.results: dict[tuple[str, int], dict] = {}
        self.done = self.images = 0
        self.start = self.last = time.time()

    def finish(self, marker: dict, split: str, index: int, reused: bool) -> None:
        """Count one finished shard, written now or reused from an earlier run."""
        self.results[(split, index)] = marker
        rep = self.report[split]
        rep.written += marker["samples"]
        rep.shards += 1
        rep.shards_reused += reused
        for kind, items in marker["skipped"].items():
            if items:
                rep.add_skipped(kind, len(items), items)
        self.done += 1
        self.images += marker["samples"]

    def progress(self, final: bool = False) -> None:
        """Log shards and images done, the rate and the ETA, at most every `every` seconds."""
        now = time.time()
        if final or now - self.last >= self.every:
            self.last = now
            elapsed = now - self.start
            rate = self.images / max(elapsed, 1e-9)
            eta = format_duration((self.num_jobs - self.done) * elapsed / self.done) if self.done else "?"
            self.log(
                f"  convert: {self.done}/{self.num_jobs} shards, {self.images:,} images written, "
                f"{rate:,.0f} images/s, ETA {eta}"
            )

    def splits(self) -> dict[str, list[tuple[str, int]]]:
        """Per split, the (relpath, samples) of the non-empty shards in order."""
        splits: dict[str, list[tuple[str, int]]] = {}
        for (split, _index), marker in sorted(self.results.items()):
            if marker["samples"] > 0:
                splits.setdefault(split, []).append((marker["path"], marker["samples"]))
        return splits


class _RayWriter:
    """`write_shard` as Ray tasks, at most twice the cluster's CPUs in flight. Ray starts (or is
    joined) with the first shard submitted, and is shut down by `close` only if this started it."""

    def __init__(self, tally: _Tally, num_cpus: int | None, every: float):
        self.tally, self.num_cpus, self.every = tally, num_cpus, every
        self.pending: dict = {}
        self.ray = self.task = None
        self.started = False
        self.capacity = 1

    def submit(self, job: ShardJob, out: str, options: ImageOptions, fingerprint: str) -> None:
        """Start `job`'s task, then wait while more than `capacity` tasks are in flight."""
        if self.task is None:
            self.started = connect_or_start_ray(self.num_cpus)
            import ray

            self.ray = ray
            self.task = ray.remote(num_cpus=1, max_retries=2)(write_shard)
            self.capacity = max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))
        self.pending[self.task.remote(job, out, options, fingerprint)] = (job.split, job.index)
        self.drain(self.capacity)

    def drain(self, block_until: int) -> None:
        """Count finished tasks until at most `block_until` are in flight (0: all have finished)."""
        while len(self.pending) > block_until:
            ready, _ = self.ray.wait(list(self.pending), num_returns=1, timeout=self.every)
            for ref in ready:
                split, index = self.pending.pop(ref)
                self.tally.finish(self.ray.get(ref), split, index, reused=False)
            self.tally.progress()

    def close(self) -> None:
        if self.started:
            self.ray.shutdown()


def run_shards(
    jobs,
    num_jobs: int,
    out: str,
    options: ImageOptions,
    report: dict[str, SplitReport],
    log=say,
    num_cpus: int | None = None,
    use_ray: bool = True,
    every: float = 5.0,
) -> dict[str, list[tuple[str, int]]]:
    """Write every job's shard as a Ray task, skipping those an earlier run finished.

    `jobs` is an iterator of ShardJob (built lazily, so the driver never holds every shard's
    labels at once). Ray starts only when a shard needs writing; `use_ray=False` writes the shards
    one after another in this process (small datasets, tests). Returns, per split, the
    (relpath, samples) of the non-empty shards in order.
    """
    markers = _prepare_output(out, report)
    tally = _Tally(report, num_jobs, log, every)
    writer = _RayWriter(tally, num_cpus, every)
    try:
        for job in jobs:
            fingerprint = job.fingerprint(options)
            old = _reusable(job, fingerprint, markers, out)
            if old is not None:
                tally.finish(old, job.split, job.index, reused=True)
            elif not use_ray:
                tally.finish(write_shard(job, out, options, fingerprint), job.split, job.index, reused=False)
                tally.progress()
            else:
                writer.submit(job, out, options, fingerprint)
        writer.drain(0)
        tally.progress(final=True)
        _remove_leftovers(out, report)
    finally:
        writer.close()
    return tally.splits()


def _remove_leftovers(out: str, splits) -> None:
    """Delete the temporary shard files of interrupted earlier runs (every shard is complete now)."""
    for split in splits:
        fs, path = fsspec.core.url_to_fs(join(out, split))
        for leftover in fs.glob(f"{path}/*.tar.tmp-*"):
            fs.rm(leftover)


def write_report(out: str, report: dict, log=say) -> None:
    """Print a summary of the conversion report and write it as `convert_report.json` in `out`."""
    with fsspec.open(join(out, "convert_report.json"), "w") as f:
        json.dump(report, f, indent=1)
    for split, rep in report.get("splits", {}).items():
        skips = ", ".join(f"{kind} {entry['count']}" for kind, entry in rep["skipped"].items()) or "none"
        log(
            f"{split}: {rep['written']:,} of {rep['planned']:,} images written in {rep['shards']} shards "
            f"({rep['shards_reused']} reused from an earlier run); skipped: {skips}"
        )
        for kind, entry in rep["skipped"].items():
            if entry["examples"]:
                shown = [f"{e[0]} ({e[1]})" if isinstance(e, list) else str(e) for e in entry["examples"][:5]]
                log(f"  {kind}, e.g.: {', '.join(shown)}")
    for name, entry in report.get("annotations", {}).items():
        for kind, value in entry.items():
            if isinstance(value, dict) and value.get("count"):
                log(f"{name}: {kind} {value['count']:,}, e.g. {', '.join(map(str, value['examples'][:5]))}")
    log(f"report: {join(out, 'convert_report.json')}")
