"""Bad input is skipped, counted and reported with shard and key; the good samples still come through.

Real tar shards written to tmp_path; the reader is datasets/stream.py, the counter
trainer/bad_samples.py. Also: nothing that comes out of a shard is ever unpickled.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from datasets.contract import Shard
from datasets.makers.shards import SplitWriter, encode_jpeg, encode_labels
from datasets.stream import ShardStream, StreamSpec, make_loader
from trainer.bad_samples import BadSampleLog, TooManyBadSamples

NUM_LABELS = 5
SIZE = 8
TRUNCATED = "unreadable or truncated shard"


def image(seed: int, size: int = SIZE) -> bytes:
    return encode_jpeg(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def good(seed: int) -> dict[str, bytes]:
    return {"jpg": image(seed), "labels.json": encode_labels([seed % NUM_LABELS], [(seed + 1) % NUM_LABELS])}


class MarkerPayload:
    """Unpickling this creates `path`: evidence that something was unpickled."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def write_shards(root: Path, samples_per_shard: list[list[tuple[str, dict]]]) -> list[Shard]:
    """One tar per inner list (each written as its own one-shard split s0, s1, ...)."""
    shards = []
    for i, samples in enumerate(samples_per_shard):
        with SplitWriter(str(root), f"s{i}", maxcount=10_000) as writer:
            for key, fields in samples:
                writer.write(key, fields)
        shards += [Shard(f"{root}/{path}", n) for path, n in writer.shards]
    return shards


def stream(shards: list[Shard], batch_size: int = 2, **kw):
    spec = StreamSpec(
        shards=shards, num_labels=NUM_LABELS, image_size=SIZE, batch_size=batch_size, train=kw.pop("train", False), **kw
    )
    return ShardStream(spec)


def run(ds, max_batches=None):
    keys, skipped, batches = [], [], []
    for batch in ds:
        batches.append(batch)
        keys += batch.keys
        skipped += batch.skipped
        if max_batches is not None and len(batches) >= max_batches:
            break
    return keys, skipped, batches


# (key, fields, expected kind or None for a good sample)
def mixed_samples(marker: Path) -> list[tuple[str, dict, str | None]]:
    payload = pickle.dumps(MarkerPayload(str(marker)))
    rng = np.random.default_rng(0)
    return [
        ("good_00", good(0), None),
        ("corrupt_jpg", {"jpg": rng.bytes(300), "labels.json": encode_labels([1], [])}, "corrupt image"),
        ("cut_jpg", {"jpg": image(9, 32)[:200], "labels.json": encode_labels([1], [])}, "corrupt image"),
        ("good_01", good(1), None),
        ("no_labels", {"jpg": image(2)}, "missing labels.json"),
        ("no_image", {"labels.json": encode_labels([1], [])}, "missing image"),
        ("not_json", {"jpg": image(3), "labels.json": b"{pos: [1"}, "malformed labels.json"),
        ("not_utf8", {"jpg": image(3), "labels.json": b"\xff\xfe\x00{"}, "malformed labels.json"),
        ("json_list", {"jpg": image(4), "labels.json": b"[1, 2]"}, "malformed labels.json"),
        ("pos_not_list", {"jpg": image(4), "labels.json": b'{"pos": 3, "neg": []}'}, "malformed labels.json"),
        ("neg_not_list", {"jpg": image(4), "labels.json": b'{"pos": [1], "neg": "2"}'}, "malformed labels.json"),
        ("no_pos", {"jpg": image(4), "labels.json": b'{"neg": [1]}'}, "malformed labels.json"),
        ("index_999", {"jpg": image(5), "labels.json": encode_labels([1, 999], [])}, "label index out of range"),
        ("index_minus1", {"jpg": image(5), "labels.json": encode_labels([1], [-1])}, "label index out of range"),
        ("index_n", {"jpg": image(5), "labels.json": encode_labels([NUM_LABELS], [])}, "label index out of range"),
        ("index_float", {"jpg": image(5), "labels.json": b'{"pos": [1.0], "neg": []}'}, "label index out of range"),
        ("index_bool", {"jpg": image(5), "labels.json": b'{"pos": [true], "neg": []}'}, "label index out of range"),
        ("pos_and_neg", {"jpg": image(6), "labels.json": encode_labels([1, 2], [2, 3])}, "label both pos and neg"),
        ("pickled", {**good(7), "pyd": payload, "pickle": payload}, None),
        ("good_02", good(8), None),
    ]


@pytest.fixture
def mixed(tmp_path):
    marker = tmp_path / "UNPICKLED"
    samples = mixed_samples(marker)
    shards = write_shards(tmp_path / "data", [[(k, f) for k, f, _ in samples]])
    return shards, samples, marker


# --- each kind is skipped, named and counted; the rest comes through -----------------------------


def test_bad_samples_skipped_with_shard_key_kind_detail(mixed):
    shards, samples, marker = mixed
    keys, skipped, batches = run(stream(shards))
    assert keys == [k for k, _, kind in samples if kind is None]
    expected = {k: kind for k, _, kind in samples if kind is not None}
    assert len(skipped) == len(expected)
    for record in skipped:
        assert isinstance(record, tuple) and len(record) == 4
        shard_url, key, kind, detail = record
        assert shard_url == shards[0].url
        assert kind == expected[key], key
        assert isinstance(detail, str)
    assert {key for _, key, _, _ in skipped} == set(expected)
    # the record order follows the shard
    assert [key for _, key, _, _ in skipped] == [k for k, _, kind in samples if kind is not None]
    # the good images and labels are intact
    labels = np.concatenate([b.labels.numpy() for b in batches if b.labels is not None])
    for row, key in zip(labels, keys):
        seed = {"good_00": 0, "good_01": 1, "pickled": 7, "good_02": 8}[key]
        assert row[seed % NUM_LABELS] == 1 and row[(seed + 1) % NUM_LABELS] == -1
        assert (row == 0).sum() == NUM_LABELS - 2


def test_details_say_what_was_wrong(mixed):
    shards, _, _ = mixed
    _, skipped, _ = run(stream(shards))
    detail = {key: d for _, key, _, d in skipped}
    assert "999" in detail["index_999"] and "-1" in detail["index_minus1"]
    assert str(NUM_LABELS) in detail["index_n"]
    assert "2" in detail["pos_and_neg"] and "1" not in detail["pos_and_neg"]
    assert detail["corrupt_jpg"]  # the decoder's error message
    assert "jpg" in detail["no_image"]


def test_nothing_is_unpickled(mixed):
    shards, samples, marker = mixed
    # control: the payload is live, unpickling it would create its file
    control = marker.with_name("CONTROL")
    pickle.loads(pickle.dumps(MarkerPayload(str(control)))).close()
    assert control.exists()
    keys, skipped, batches = run(stream(shards))
    assert not marker.exists()
    assert "pickled" in keys  # the sample itself is fine
    assert "pickled" not in {key for _, key, _, _ in skipped}
    for b in batches:  # the pickle fields are not passed on: a Batch has only its typed fields
        assert set(vars(b)) == {"images", "labels", "keys", "epochs", "positions", "skipped"}
    # also not in training mode, nor through DataLoader processes
    run(stream(shards, train=True, shuffle_buffer=3), max_batches=6)
    run(make_loader(StreamSpec(shards, NUM_LABELS, SIZE, 2, train=False), loader_workers=2))
    assert not marker.exists()


def test_reports_survive_loader_processes(tmp_path):
    marker = tmp_path / "UNPICKLED"
    samples = mixed_samples(marker)
    half = len(samples) // 2
    shards = write_shards(
        tmp_path / "data", [[(k, f) for k, f, _ in samples[:half]], [(k, f) for k, f, _ in samples[half:]]]
    )
    keys, skipped, _ = run(make_loader(StreamSpec(shards, NUM_LABELS, SIZE, 2, train=False), loader_workers=2))
    assert sorted(keys) == sorted(k for k, _, kind in samples if kind is None)
    assert sorted(key for _, key, _, _ in skipped) == sorted(k for k, _, kind in samples if kind is not None)
    assert {url for url, _, _, _ in skipped} == {s.url for s in shards}


def test_a_shard_of_only_bad_samples_still_reports(tmp_path):
    bad = [(f"bad_{i}", {"jpg": b"not an image", "labels.json": encode_labels([0], [])}) for i in range(3)]
    shards = write_shards(tmp_path, [bad])
    keys, skipped, batches = run(stream(shards))
    assert keys == []
    assert [(key, kind) for _, key, kind, _ in skipped] == [(f"bad_{i}", "corrupt image") for i in range(3)]
    assert all(b.images is None and b.keys == [] for b in batches)


ALL_BAD_TRAINING = """
import json, os, sys, threading, time
from datasets.contract import Shard
from datasets.makers.shards import SplitWriter, encode_labels
from datasets.stream import ShardStream, StreamSpec
root = sys.argv[1]
with SplitWriter(root, "s0") as writer:
    for i in range(3):
        writer.write(f"bad_{i}", {"jpg": b"not an image", "labels.json": encode_labels([0], [])})
shards = [Shard(f"{root}/{path}", n) for path, n in writer.shards]
def watchdog():  # imports done: the stream itself gets 5 s
    time.sleep(5)
    print("TIMEOUT", flush=True)
    os._exit(3)
threading.Thread(target=watchdog, daemon=True).start()
batch = next(iter(ShardStream(StreamSpec(shards, 5, 8, 2, train=True))), None)
print(json.dumps(None if batch is None else [list(r) for r in batch.skipped]))
"""


def test_a_training_stream_of_only_bad_samples_reports_or_ends(tmp_path):
    """An endless stream whose samples all fail to decode must not spin silently over epochs
    (run in a child process with a watchdog, so a regression fails instead of hanging)."""
    script = tmp_path / "all_bad.py"
    script.write_text(ALL_BAD_TRAINING)
    repo = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "data")],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=repo,
        env=env,
    )
    assert "TIMEOUT" not in proc.stdout, "the training stream over all-bad shards neither yielded nor ended in 5 s"
    assert proc.returncode == 0, proc.stderr
    records = json.loads(proc.stdout)
    # either the stream ended, or its first batch carries the skip records
    if records is not None:
        assert records and {r[2] for r in records} == {"corrupt image"}


def test_missing_shard_file_is_reported(tmp_path):
    shards = write_shards(tmp_path, [[("a_0", good(0))], [("b_0", good(1))]])
    os.remove(shards[0].url)
    keys, skipped, _ = run(stream(shards))
    assert keys == ["b_0"]
    assert [(url, kind) for url, _, kind, _ in skipped] == [(shards[0].url, TRUNCATED)]


# --- truncated shards ----------------------------------------------------------------------------


def tar_layout(path: str) -> list[tuple[str, int, int, int]]:
    """(member name, header offset, data offset, data end) of every member of a tar file."""
    with tarfile.open(path) as tar:
        return [(m.name, m.offset, m.offset_data, m.offset_data + m.size) for m in tar.getmembers()]


def complete_before(layout, cut: int) -> list[str]:
    """Keys whose every member lies wholly before byte `cut`, in shard order."""
    keys = []
    for name, _, _, _end in layout:
        key = name.split(".", 1)[0]
        if key not in keys:
            keys.append(key)
    incomplete = {name.split(".", 1)[0] for name, _, _, end in layout if end > cut}
    return [k for k in keys if k not in incomplete]


def truncate_inside(shard: Shard, member: str) -> tuple[list[str], str]:
    """Cut the tar at ~60% of its bytes, moved into the middle of the data of the first `member`
    (jpg: a sample's first field; labels.json: its last) that ends after 60%.
    Returns (keys complete before the cut, key of the sample cut)."""
    layout = tar_layout(shard.url)
    data = Path(shard.url).read_bytes()
    name, _, start, end = next(m for m in layout if m[0].endswith("." + member) and m[3] > 0.6 * len(data))
    cut = (start + end) // 2
    Path(shard.url).write_bytes(data[:cut])
    return complete_before(layout, cut), name.split(".", 1)[0]


def make_truncated(root: Path, member: str):
    """A good shard of 8 samples cut inside a member's data, then a good shard."""
    first = [(f"a_{i}", {"jpg": image(i, 24), "labels.json": encode_labels([i % NUM_LABELS], [])}) for i in range(8)]
    second = [(f"b_{i}", good(i)) for i in range(3)]
    shards = write_shards(root, [first, second])
    complete, cut_key = truncate_inside(shards[0], member)
    return shards, complete, cut_key


@pytest.mark.parametrize("member", ["jpg", "labels.json"])
def test_truncated_shard_reported_earlier_samples_kept_next_shard_read(tmp_path, member):
    """Cut inside a sample's first field (jpg) or its last (labels.json): every complete sample
    before the cut comes through, the cut sample does not, the record names it, the next shard is read."""
    shards, complete, cut_key = make_truncated(tmp_path, member)
    assert 3 <= len(complete) < 8 and cut_key == f"a_{len(complete)}"
    keys, skipped, _ = run(stream(shards))
    assert [k for k in keys if k.startswith("a_")] == complete
    assert [k for k in keys if k.startswith("b_")] == ["b_0", "b_1", "b_2"]
    assert len(skipped) == 1
    url, key, kind, detail = skipped[0]
    assert (url, key, kind) == (shards[0].url, cut_key, TRUNCATED)
    assert "end of data" in detail


@pytest.mark.parametrize("where", ["at header", "inside header"])
def test_shard_cut_between_samples_is_reported(tmp_path, where):
    """tarfile takes a missing or short header for the end of the archive; the reader still notices
    (it knows from dataset.json how many samples the shard holds)."""
    first = [(f"a_{i}", good(i)) for i in range(4)]
    shards = write_shards(tmp_path, [first, [("b_0", good(9))]])
    path = shards[0].url
    layout = tar_layout(path)
    header_of_a2 = next(offset for name, offset, _, _ in layout if name.startswith("a_2."))
    cut = header_of_a2 + (0 if where == "at header" else 100)
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[:cut])
    keys, skipped, _ = run(stream(shards))
    assert keys == ["a_0", "a_1", "b_0"]
    assert [(r[0], r[2]) for r in skipped] == [(path, TRUNCATED)]
    assert "2 of the 4" in skipped[0][3]


def test_shard_cut_between_fields_is_reported(tmp_path):
    """A cut at the header of a sample's labels.json: the sample is skipped and the shard reported."""
    shards = write_shards(tmp_path, [[(f"a_{i}", good(i)) for i in range(4)]])
    path = shards[0].url
    header = next(offset for name, offset, _, _ in tar_layout(path) if name == "a_1.labels.json")
    Path(path).write_bytes(Path(path).read_bytes()[:header])
    keys, skipped, _ = run(stream(shards))
    assert keys == ["a_0"]
    assert {(r[0], r[2]) for r in skipped} >= {(path, TRUNCATED)}
    assert {r[1] for r in skipped} & {"a_1", "-"}
    assert all(r[0] == path for r in skipped)


def test_empty_shard_file_is_reported(tmp_path):
    shards = write_shards(tmp_path, [[("a_0", good(0))], [("b_0", good(1))]])
    Path(shards[0].url).write_bytes(b"")
    keys, skipped, _ = run(stream(shards))
    assert keys == ["b_0"]
    assert [(r[0], r[1], r[2]) for r in skipped] == [(shards[0].url, "-", TRUNCATED)]


def test_garbage_shard_file_is_reported(tmp_path):
    shards = write_shards(tmp_path, [[("a_0", good(0))], [("b_0", good(1))]])
    Path(shards[0].url).write_bytes(np.random.default_rng(0).bytes(5000))
    keys, skipped, _ = run(stream(shards))
    assert keys == ["b_0"]
    assert [(r[0], r[2]) for r in skipped] == [(shards[0].url, TRUNCATED)]


# --- counting: BadSampleLog ----------------------------------------------------------------------


def test_bad_sample_log_counts_by_kind_and_prints_shard_and_key(mixed, capsys):
    shards, samples, _ = mixed
    log = BadSampleLog(rank=0, max_fraction=1.0, min_read=1)
    for batch in stream(shards):
        log.add(batch)
    expected: dict[str, int] = {}
    for _, _, kind in samples:
        if kind is not None:
            expected[kind] = expected.get(kind, 0) + 1
    assert dict(log.by_kind) == expected
    assert log.count == sum(expected.values())
    assert log.read == len(samples)
    assert {(e["shard"], e["key"], e["kind"]) for e in log.examples} == {
        (shards[0].url, k, kind) for k, _, kind in samples if kind is not None
    }
    printed = capsys.readouterr().out
    assert f"shard {shards[0].url} key index_999: label index out of range" in printed
    summary = log.summary()
    assert summary["count"] == log.count and summary["read"] == len(samples)
    assert summary["by_kind"] == expected
    assert len(summary["examples"]) == log.count


def test_bad_sample_log_raises_when_bad_fraction_exceeds_max(mixed, capsys):
    shards, samples, _ = mixed
    log = BadSampleLog(rank=3, max_fraction=0.2, min_read=4)
    with pytest.raises(TooManyBadSamples) as exc:
        for batch in stream(shards):
            log.add(batch)
    message = str(exc.value)
    assert "rank 3" in message and "0.2" in message
    assert log.count > 0.2 * log.read and log.read >= 4
    assert "corrupt image" in message  # the counts by kind are in the message


def test_bad_sample_log_waits_for_min_read(mixed, capsys):
    shards, samples, _ = mixed
    log = BadSampleLog(max_fraction=0.01, min_read=len(samples) + 1)
    for batch in stream(shards):
        log.add(batch)  # never reaches min_read: no error
    assert log.count == sum(kind is not None for _, _, kind in samples)


def test_bad_sample_log_tolerates_a_small_bad_fraction(tmp_path, capsys):
    samples = [(f"g_{i}", good(i)) for i in range(20)]
    samples.insert(7, ("bad", {"jpg": b"junk", "labels.json": encode_labels([0], [])}))
    shards = write_shards(tmp_path, [samples])
    log = BadSampleLog(max_fraction=0.1, min_read=10)  # 1 bad in 9 read would exceed it: not counted yet
    for batch in stream(shards, batch_size=4):
        log.add(batch)
    assert log.read == 21 and dict(log.by_kind) == {"corrupt image": 1}
    assert log.examples == [
        {"shard": shards[0].url, "key": "bad", "kind": "corrupt image", "detail": log.examples[0]["detail"]}
    ]
