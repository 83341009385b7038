"""The data-path findings of the adversarial audit (docs/reliability.md, Data path), each against real
components: a dataset written by `lesa synth`'s writer, real tar shards read by the real stream,
BadSampleLog counting, read_dataset / write_metadata / label_vectors on real files.

- a shard that cannot be read counts as all its unread samples, so data.max_bad_fraction trips;
- images decode only in the project's formats and up to the pixel limit, by the header;
- label vectors are finite and non-zero, a dataset has seen and unseen labels, no shard is listed twice.
"""

from __future__ import annotations

import json
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest

from datasets.contract import DatasetError, Label, Shard, read_dataset, write_metadata
from datasets.images import MAX_PIXELS, BadSample
from datasets.makers.convert import ImageOptions, reencode_image
from datasets.makers.embeddings import label_vectors
from datasets.makers.shards import SplitWriter, encode_jpeg, encode_labels
from datasets.makers.synthetic import write_synthetic
from datasets.stream import TRUNCATED_SHARD, ShardStream, StreamSpec, make_loader
from trainer.bad_samples import BadSampleLog, TooManyBadSamples

SHARD_SIZE = 25


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    write_synthetic(str(root), seed=1, sizes={"train": 200}, image_size=16, shard_size=SHARD_SIZE, log=lambda *_: None)
    return root


def broken_copy(synth: Path, tmp_path: Path, damage: dict[int, str]):
    """A copy of the synthetic dataset with shards damaged by index: 'garbage', 'empty',
    'missing' or 'cut' (cut at 40% of its bytes)."""
    root = tmp_path / "data"
    for path in synth.rglob("*"):
        if path.is_file():
            (root / path.relative_to(synth)).parent.mkdir(parents=True, exist_ok=True)
            (root / path.relative_to(synth)).write_bytes(path.read_bytes())
    info = read_dataset(str(root))
    for index, how in damage.items():
        shard = Path(info.shards("train")[index].url)
        data = shard.read_bytes()
        if how == "garbage":
            shard.write_bytes(np.random.default_rng(index).bytes(len(data)))
        elif how == "empty":
            shard.write_bytes(b"")
        elif how == "missing":
            shard.unlink()
        else:
            shard.write_bytes(data[: int(0.4 * len(data))])
    return info


def count_bad(info, loader_workers: int = 0, max_fraction: float = 1.0) -> BadSampleLog:
    spec = StreamSpec(info.shards("train"), info.num_labels, 16, 8, train=False)
    log = BadSampleLog(max_fraction=max_fraction, min_read=50)
    for batch in make_loader(spec, loader_workers) if loader_workers else ShardStream(spec):
        log.add(batch)
    return log


# --- 2. an unreadable shard counts as the samples it holds ----------------------------------------


def test_unreadable_shards_count_every_sample_they_hold(synth, tmp_path, capsys):
    """3 of 8 shards unreadable: 75 of 200 samples bad (37.5%), not 3 of 128 (2.3%)."""
    info = broken_copy(synth, tmp_path, {1: "garbage", 4: "empty", 6: "missing"})
    log = count_bad(info)
    assert log.read == 200
    assert dict(log.by_kind) == {TRUNCATED_SHARD: 3 * SHARD_SIZE}
    assert len(log.examples) == 3  # one record per shard, not 75 lines
    assert "25 of its 25 samples unread" in log.examples[0]["detail"]


def test_unreadable_shards_trip_max_bad_fraction(synth, tmp_path, capsys):
    info = broken_copy(synth, tmp_path, {1: "garbage", 4: "empty", 6: "missing"})
    with pytest.raises(TooManyBadSamples, match="max_bad_fraction=0.05"):
        count_bad(info, max_fraction=0.05)


def test_a_shard_cut_short_counts_its_unread_samples_through_loader_processes(synth, tmp_path, capsys):
    """A shard cut at 40%: what was read before the cut is good, the rest is counted bad, and the
    count survives the loader processes' queue."""
    info = broken_copy(synth, tmp_path, {2: "cut"})
    log = count_bad(info, loader_workers=2)
    good = log.read - log.count
    assert log.read == 200 and 175 < good < 200
    assert dict(log.by_kind) == {TRUNCATED_SHARD: 200 - good}
    assert log.summary()["count"] == 200 - good


@pytest.mark.parametrize("how", ["garbage", "cut"])
def test_extraction_record_counts_a_broken_shards_unread_samples_as_read(synth, tmp_path, how):
    """`lesa extract`'s per-shard record: `read` is the shard's samples (dataset.json's count), good
    and bad, not the good ones plus one for the broken shard; its progress line sums `read`."""
    from datasets.makers.features import ExtractSettings, ShardExtractor
    from trainer.models.backbones import SmallCNN

    info = broken_copy(synth, tmp_path, {3: how})
    shard = info.shards("train")[3]
    settings = ExtractSettings("small_cnn", None, 16, 8, loader_workers=0, use_gpu=False, cpus_per_worker=1)
    extractor = ShardExtractor(SmallCNN, settings)
    job = {
        "split": "train",
        "relpath": "train/3.tar",
        "source": shard.url,
        "samples": shard.samples,
        "num_labels": info.num_labels,
        "out": str(tmp_path / "features-3.tar"),
        "record": str(tmp_path / "record.json"),
    }
    record = extractor.extract(job)
    ((skip,),) = [record["skipped"]]
    unread = int(re.search(r"(\d+) of its 25 samples unread", skip["detail"]).group(1))
    assert skip["kind"] == TRUNCATED_SHARD
    assert record["read"] == shard.samples == SHARD_SIZE  # the old count: samples written + 1
    assert record["samples"] + unread == SHARD_SIZE
    assert unread == SHARD_SIZE if how == "garbage" else 0 < unread < SHARD_SIZE


# --- 5. decoder limits -----------------------------------------------------------------------------

EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n0 0 moveto 8 8 lineto stroke\nshowpage\n%%EOF\n"


def png_header(width: int, height: int) -> bytes:
    """A PNG claiming width x height RGB pixels, with one small IDAT: the header alone says the size."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(bytes(4096))) + chunk(b"IEND", b"")
    )


def test_refused_formats_and_oversized_images_are_counted_not_decoded(tmp_path, capsys):
    ok = encode_jpeg(np.full((8, 8, 3), 128, np.uint8))
    samples = {
        "good": ok,
        "eps": EPS,
        "pdf_like": b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n" + bytes(200),
        "tiff": b"II*\x00" + bytes(200),
        "huge_png": png_header(13_000, 13_000),
        "good2": ok,
    }
    with SplitWriter(str(tmp_path), "s", maxcount=100) as writer:
        for key, image in samples.items():
            writer.write(key, {"jpg": image, "labels.json": encode_labels([0], [])})
    ((path, n),) = writer.shards
    spec = StreamSpec([Shard(f"{tmp_path}/{path}", n)], 2, 8, 4, train=False)
    log = BadSampleLog(min_read=1)
    keys = []
    for batch in ShardStream(spec):
        log.add(batch)
        keys += batch.keys
    kinds = {e["key"]: e["kind"] for e in log.examples}
    assert keys == ["good", "good2"]
    assert kinds == {
        "eps": "unsupported image format",
        "pdf_like": "corrupt image",  # PIL has no PDF reader: not an image at all
        "tiff": "unsupported image format",
        "huge_png": "image too large",
    }
    detail = {e["key"]: e["detail"] for e in log.examples}
    assert "EPS" in detail["eps"] and "13000 x 13000" in detail["huge_png"]
    assert log.count == 4 and log.read == 6


def test_pixel_limit_is_64_megapixels_and_applies_at_the_limit(tmp_path):
    from datasets.stream import decode_image

    assert MAX_PIXELS == 8192 * 8192
    with pytest.raises(BadSample) as exc:
        decode_image(png_header(8192, 8193), 8)
    assert exc.value.kind == "image too large"
    with pytest.raises(BadSample) as exc:  # at the limit it is decoded: here the data is short
        decode_image(png_header(8192, 8192), 8)
    assert exc.value.kind == "corrupt image"


def test_the_converter_refuses_eps_and_oversized_images():
    for data, kind in ((EPS, "unsupported image format"), (png_header(13_000, 13_000), "image too large")):
        with pytest.raises(BadSample) as exc:
            reencode_image(data, ImageOptions())
        assert exc.value.kind == kind
    photo = encode_jpeg(np.full((40, 60, 3), 200, np.uint8))
    assert reencode_image(photo, ImageOptions(short_side=20))[:2] == b"\xff\xd8"


# --- 4. inputs validated where they enter ----------------------------------------------------------


def small_dataset(root: Path, embeddings=None, roles=("seen", "seen", "unseen")) -> None:
    labels = [Label(i, f"id{i}", f"name {i}", role) for i, role in enumerate(roles)]
    with SplitWriter(str(root), "test", maxcount=10) as writer:
        writer.write("a", {"jpg": encode_jpeg(np.zeros((8, 8, 3), np.uint8)), "labels.json": encode_labels([0], [])})
    emb = np.arange(1, 1 + 4 * len(roles), dtype=np.float32).reshape(len(roles), 4)
    write_metadata(
        str(root), "small", "image", labels, emb if embeddings is None else embeddings, {"test": writer.shards}
    )


@pytest.mark.parametrize(
    "value, what", [(np.nan, "NaN or Inf"), (np.inf, "NaN or Inf"), (-np.inf, "NaN or Inf"), (0.0, "only zeros")]
)
def test_read_dataset_refuses_bad_label_vectors_naming_file_and_label(tmp_path, value, what):
    small_dataset(tmp_path)
    emb = np.load(tmp_path / "embeddings.npy")
    emb[1] = value if what == "only zeros" else emb[1]
    if what != "only zeros":
        emb[1, 2] = value
    np.save(tmp_path / "embeddings.npy", emb)
    with pytest.raises(DatasetError) as exc:
        read_dataset(str(tmp_path))
    message = str(exc.value)
    assert "embeddings.npy" in message and what in message and "row 1 'name 1'" in message
    assert "convert the dataset again" in message and "\n" not in message


@pytest.mark.parametrize(
    "roles, counts", [(("seen", "seen"), "2 seen and 0 unseen"), (("unseen",) * 3, "0 seen and 3 unseen")]
)
def test_read_dataset_needs_a_seen_and_an_unseen_label(tmp_path, roles, counts):
    small_dataset(tmp_path)
    lines = ["index\tid\tname\trole"] + [f"{i}\tid{i}\tname {i}\t{r}" for i, r in enumerate(roles)]
    (tmp_path / "labels.tsv").write_text("\n".join(lines) + "\n")
    np.save(tmp_path / "embeddings.npy", np.ones((len(roles), 4), np.float32))
    with pytest.raises(DatasetError, match="dataset.json") as exc:
        read_dataset(str(tmp_path))
    assert counts in str(exc.value)


def test_a_shard_listed_twice_is_refused(tmp_path):
    small_dataset(tmp_path)
    meta = json.loads((tmp_path / "dataset.json").read_text())
    meta["splits"]["test"]["shards"] *= 2
    (tmp_path / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(DatasetError, match="dataset.json") as exc:
        read_dataset(str(tmp_path))
    assert "'test'" in str(exc.value) and "test-000000.tar twice" in str(exc.value)


def test_write_metadata_writes_nothing_read_dataset_would_refuse(tmp_path):
    with pytest.raises(DatasetError, match="only zeros"):
        small_dataset(tmp_path / "zero", embeddings=np.zeros((3, 4)))
    with pytest.raises(DatasetError, match="0 unseen"):
        small_dataset(tmp_path / "roles", roles=("seen", "seen"))
    assert not (tmp_path / "zero" / "dataset.json").exists() and not (tmp_path / "roles" / "dataset.json").exists()


def test_conversion_refuses_bad_precomputed_vectors(tmp_path):
    names = ["cat", "dog", "sky"]
    matrix = np.ones((3, 4), np.float32)
    matrix[2, 0] = np.nan
    np.save(tmp_path / "emb.npy", matrix)
    with pytest.raises(DatasetError) as exc:
        label_vectors(names, None, None, str(tmp_path / "emb.npy"), "error")
    assert "emb.npy" in str(exc.value) and "row 2 'sky'" in str(exc.value)


def test_convert_offers_no_missing_zero_and_missing_random_gives_usable_vectors(tmp_path, capsys):
    """A zero vector is refused as a label vector, so `--missing zero` is no choice of the CLI."""
    from launch.cli import main

    vectors = tmp_path / "vectors.txt"
    vectors.write_text("cat 0.1 0.2 0.3\ndog 0.3 0.2 0.1\n")
    with pytest.raises(SystemExit) as exc:
        main(["convert", "nuswide", "--root", str(tmp_path), "--out", str(tmp_path / "out"), "--missing", "zero"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "--missing: invalid choice: 'zero'" in err and "random" in err
    with pytest.raises(DatasetError, match="unicorn.*--missing random"):
        label_vectors(["cat", "dog", "unicorn"], str(vectors), None, None, "error", log=lambda *_: None)
    out = label_vectors(["cat", "dog", "unicorn"], str(vectors), None, None, "random", log=lambda *_: None)
    assert np.isfinite(out).all() and out.any(axis=1).all()
