"""The synthetic colour x shape benchmark (datasets/makers/synthetic.py) and what write_synthetic writes."""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from datasets.contract import read_dataset
from datasets.makers.synthetic import COLOURS, SHAPES, SyntheticBenchmark, write_synthetic

SIZE = 48  # small images keep the tests fast; the label logic does not depend on the size


@pytest.fixture(scope="module")
def bench():
    return SyntheticBenchmark(seed=7, image_size=SIZE)


def test_vocabulary(bench):
    assert len(bench.compositions) == 64 == len(COLOURS) * len(SHAPES)
    assert len(bench.unseen) == 15 and len(bench.seen) == 49
    assert set(bench.unseen).isdisjoint(bench.seen)
    assert set(bench.unseen) | set(bench.seen) == set(bench.compositions)
    labels = bench.labels
    assert [lab.index for lab in labels] == list(range(64))
    assert sum(lab.role == "unseen" for lab in labels) == 15
    assert len({lab.id for lab in labels}) == 64
    for lab in labels:
        c, s = bench.compositions[lab.index]
        assert lab.id == f"{bench.colours[c]}_{bench.shapes[s]}"
        assert lab.role == ("unseen" if (c, s) in set(bench.unseen) else "seen")


@pytest.mark.parametrize("seed", [0, 1, 7, 12345])
def test_unseen_attributes_are_all_seen_elsewhere(seed):
    b = SyntheticBenchmark(seed=seed, image_size=SIZE)
    assert len(b.unseen) == 15
    seen_colours = {c for c, _ in b.seen}
    seen_shapes = {s for _, s in b.seen}
    for c, s in b.unseen:
        assert c in seen_colours and s in seen_shapes
    # at most two unseen compositions per colour and per shape
    assert max(Counter(c for c, _ in b.unseen).values()) <= 2
    assert max(Counter(s for _, s in b.unseen).values()) <= 2


def test_embeddings(bench):
    e = bench.embeddings
    assert e.shape == (64, 32) and e.dtype == np.float32
    assert np.isfinite(e).all()
    # labels sharing a colour are closer in the colour half than labels that do not
    idx = {comp: i for i, comp in enumerate(bench.compositions)}
    same = np.dot(e[idx[(0, 0)], :16], e[idx[(0, 5)], :16])
    assert same > 0.5
    assert not np.allclose(e, SyntheticBenchmark(seed=8, image_size=SIZE).embeddings)
    np.testing.assert_array_equal(e, SyntheticBenchmark(seed=7, image_size=SIZE).embeddings)


def test_vocabulary_depends_on_seed():
    unseen = {tuple(SyntheticBenchmark(seed=s, image_size=SIZE).unseen) for s in range(6)}
    assert len(unseen) > 1


def test_samples_are_deterministic(bench):
    again = SyntheticBenchmark(seed=7, image_size=SIZE)
    other = SyntheticBenchmark(seed=8, image_size=SIZE)
    for split, index in [("train", 0), ("train", 5), ("val", 3), ("test", 11)]:
        img1, pos1, neg1 = bench.sample(split, index)
        img2, pos2, neg2 = again.sample(split, index)
        assert img1.tobytes() == img2.tobytes()
        assert (pos1, neg1) == (pos2, neg2)
        img3, pos3, neg3 = other.sample(split, index)
        assert img1.tobytes() != img3.tobytes()
        assert (pos1, neg1) != (pos3, neg3)
    # a different index or split is a different image
    assert bench.sample("train", 0)[0].tobytes() != bench.sample("train", 1)[0].tobytes()
    assert bench.sample("train", 0)[0].tobytes() != bench.sample("val", 0)[0].tobytes()


def test_image_format(bench):
    img, _, _ = bench.sample("train", 0)
    assert img.shape == (SIZE, SIZE, 3) and img.dtype == np.uint8
    assert SyntheticBenchmark(seed=7, image_size=64).sample("test", 2)[0].shape == (64, 64, 3)


def check_labels(bench, split, n):
    unseen = {i for i, comp in enumerate(bench.compositions) if comp in set(bench.unseen)}
    unseen_positive_images = 0
    unknown_total = 0
    for index in range(n):
        _, pos, neg = bench.sample(split, index)
        assert 2 <= len(pos) <= 5
        assert len(set(pos)) == len(pos) and pos == sorted(pos)
        assert set(pos).isdisjoint(neg)
        assert all(0 <= i < 64 for i in pos + neg)
        unknown_total += 64 - len(pos) - len(neg)
        unseen_positive_images += bool(unseen & set(pos))
    return unseen_positive_images, unknown_total


def test_train_and_val_have_no_unseen_positives(bench):
    for split in ("train", "val"):
        unseen_pos, unknown = check_labels(bench, split, 200 if split == "train" else 100)
        assert unseen_pos == 0, split
        assert unknown > 0, split  # ~10% of negatives are left unannotated


def test_test_split_has_unseen_positives(bench):
    unseen_pos, unknown = check_labels(bench, "test", 60)
    # each test image draws 2-5 of 64 compositions, 15 of them unseen: most images have one
    assert unseen_pos >= 20
    assert unknown > 0


def test_unknown_fraction(bench):
    none_unknown = SyntheticBenchmark(seed=7, image_size=SIZE, unknown_fraction=0.0)
    for i in range(5):
        _, pos, neg = none_unknown.sample("train", i)
        assert len(pos) + len(neg) == 64
    counts = []
    for i in range(40):
        _, pos, neg = bench.sample("train", i)
        counts.append((64 - len(pos) - len(neg)) / (64 - len(pos)))
    assert 0.04 < np.mean(counts) < 0.2  # unknown_fraction = 0.1


def test_positive_objects_are_drawn(bench):
    """Each positive composition's colour appears in the image (the objects are really there)."""
    for index in range(5):
        img, pos, _ = bench.sample("train", index)
        pixels = img.reshape(-1, 3).astype(int)
        for label in pos:
            c, _ = bench.compositions[label]
            rgb = np.array(COLOURS[bench.colours[c]])
            assert (np.abs(pixels - rgb).max(axis=1) <= 3).sum() >= 4, (index, label)


def tar_samples(path) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            key, ext = member.name.split(".", 1)
            samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


def test_write_synthetic_round_trip(tmp_path):
    root = tmp_path / "synth"
    logs = []
    sizes = {"train": 40, "val": 8, "test": 16}
    write_synthetic(str(root), seed=3, sizes=sizes, image_size=32, shard_size=16, workers=1, log=logs.append)
    assert logs and "49 seen + 15 unseen" in logs[-1]

    info = read_dataset(str(root))
    assert info.name == "synthetic-seed3" and info.kind == "image"
    assert info.num_labels == 64 and len(info.seen) == 49 and len(info.unseen) == 15
    assert info.embeddings.shape == (64, 32) and info.embeddings.dtype == np.float32
    bench = SyntheticBenchmark(seed=3, image_size=32)
    np.testing.assert_array_equal(info.embeddings, bench.embeddings)
    assert [lab.role for lab in info.labels] == [lab.role for lab in bench.labels]

    assert set(info.splits) == set(sizes)
    assert [s.samples for s in info.shards("train")] == [16, 16, 8]
    assert [s.samples for s in info.shards("val")] == [8]
    assert [s.samples for s in info.shards("test")] == [16]
    meta = json.loads((root / "dataset.json").read_text())
    assert meta["splits"]["train"]["samples"] == 40 and meta["image_size"] == 32 and meta["seed"] == 3

    for split, count in sizes.items():
        seen_keys = []
        for shard in info.shards(split):
            samples = tar_samples(shard.url)
            assert len(samples) == shard.samples
            seen_keys += list(samples)
            for key, fields in samples.items():
                assert set(fields) == {"jpg", "labels.json"}
                labels = json.loads(fields["labels.json"])
                assert set(labels) == {"pos", "neg"}
                index = int(key[len(split) :])
                _, pos, neg = bench.sample(split, index)
                assert labels == {"pos": pos, "neg": sorted(neg)}
                image = np.asarray(Image.open(io.BytesIO(fields["jpg"])))
                assert image.shape == (32, 32, 3)
        # written in order, one key per image
        assert seen_keys == [f"{split}{i:07d}" for i in range(count)]


def test_write_synthetic_is_deterministic(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for root in (a, b):
        write_synthetic(
            str(root), seed=5, sizes={"train": 6}, image_size=32, shard_size=4, workers=1, log=lambda _: None
        )
    for rel in ("train/train-000000.tar", "train/train-000001.tar"):
        sa, sb = tar_samples(a / rel), tar_samples(b / rel)
        assert sa == sb and len(sa) in (4, 2)
    assert (a / "labels.tsv").read_bytes() == (b / "labels.tsv").read_bytes()
    assert (a / "embeddings.npy").read_bytes() == (b / "embeddings.npy").read_bytes()


def test_embed_noise_changes_only_the_label_vectors(tmp_path):
    """`lesa synth --embed-noise`: the same images, label vectors whose part that the colour and
    shape do not predict has the asked norm relative to the part they do."""
    from launch import cli

    root = tmp_path / "noisy"
    assert (
        cli.main(
            [
                "synth",
                str(root),
                "--seed",
                "3",
                "--train",
                "4",
                "--val",
                "0",
                "--test",
                "0",
                "--image-size",
                "32",
                "--workers",
                "1",
                "--embed-noise",
                "1.0",
            ]
        )
        == 0
    )
    info = read_dataset(str(root))
    assert json.loads((root / "dataset.json").read_text())["embed_noise"] == 1.0
    noisy = SyntheticBenchmark(seed=3, image_size=32, embed_noise=1.0)
    np.testing.assert_array_equal(info.embeddings, noisy.embeddings)

    clean = SyntheticBenchmark(seed=3, image_size=32, embed_noise=0.0)
    default = SyntheticBenchmark(seed=3, image_size=32)
    assert noisy.sample("train", 2)[0].tobytes() == default.sample("train", 2)[0].tobytes()
    ratio = lambda b: np.linalg.norm(b.embeddings - clean.embeddings, axis=1) / np.linalg.norm(clean.embeddings, axis=1)
    assert 0.8 < ratio(noisy).mean() < 1.2
    assert 0.12 < ratio(default).mean() < 0.18
