"""The dataset contract on disk: SplitWriter + write_metadata -> read_dataset -> ShardStream.

Real tar shards in tmp_path, read back through the same stages the trainer uses.
"""

from __future__ import annotations

import json
import tarfile

import numpy as np
import psutil
import pytest
import torch

from datasets.batch import Batch
from datasets.contract import DatasetError, Label, read_dataset, write_metadata
from datasets.makers.shards import SplitWriter, encode_jpeg, encode_labels
from datasets.stream import ShardStream, StreamSpec, epoch_shards, make_loader

SIZE = 16
NUM_LABELS = 6
ROLES = ["seen", "seen", "unseen", "seen", "unseen", "seen"]
COLOURS = {"red": (230, 20, 20), "green": (20, 230, 20), "blue": (20, 20, 230)}


def solid(h: int, w: int, rgb) -> np.ndarray:
    return np.broadcast_to(np.array(rgb, dtype=np.uint8), (h, w, 3)).copy()


def bands(h: int, w: int, horizontal: bool, outer: int = 40) -> np.ndarray:
    """Red | green | blue along the long side: `outer` pixels of red and of blue at the ends."""
    img = solid(h, w, COLOURS["green"])
    if horizontal:
        img[:, :outer] = COLOURS["red"]
        img[:, w - outer :] = COLOURS["blue"]
    else:
        img[:outer] = COLOURS["red"]
        img[h - outer :] = COLOURS["blue"]
    return img


def sample_labels(i: int) -> tuple[list[int], list[int]]:
    """Deterministic per sample: a few positives, a few negatives, the rest unknown."""
    pos = sorted({i % NUM_LABELS, (i * 3 + 1) % NUM_LABELS})
    neg = sorted({(i + 2) % NUM_LABELS} - set(pos))
    return pos, neg


def expected_vector(i: int) -> np.ndarray:
    pos, neg = sample_labels(i)
    y = np.zeros(NUM_LABELS, dtype=np.int8)
    y[neg] = -1
    y[pos] = 1
    return y


def make_dataset(root, counts: dict[str, int], maxcount: int, odd_shapes: bool = False):
    """A tiny image dataset; sample i of a split is keyed f"{split}{i:04d}"."""
    splits = {}
    for split, n in counts.items():
        with SplitWriter(str(root), split, maxcount=maxcount) as writer:
            for i in range(n):
                if odd_shapes and i % 3 == 1:
                    image = bands(32, 96, horizontal=True)  # landscape, 96 wide x 32 high
                elif odd_shapes and i % 3 == 2:
                    image = bands(96, 32, horizontal=False)  # portrait, 32 wide x 96 high
                else:
                    image = solid(SIZE, SIZE, (10 * (i % 20), 100, 200))
                pos, neg = sample_labels(i)
                writer.write(
                    f"{split}{i:04d}", {"jpg": encode_jpeg(image, quality=95), "labels.json": encode_labels(pos, neg)}
                )
        splits[split] = writer.shards
    labels = [Label(j, f"id{j}", f"name {j}", ROLES[j]) for j in range(NUM_LABELS)]
    emb = np.arange(NUM_LABELS * 5, dtype=np.float64).reshape(NUM_LABELS, 5)
    write_metadata(str(root), "tiny", "image", labels, emb, splits, extra={"note": "test"})
    return splits


def spec_for(info, split="test", **kw) -> StreamSpec:
    args = dict(shards=info.shards(split), num_labels=info.num_labels, image_size=SIZE, batch_size=3, train=False)
    args.update(kw)
    return StreamSpec(**args)


def collect(stream, max_batches=None):
    batches = []
    for batch in stream:
        batches.append(batch)
        if max_batches is not None and len(batches) >= max_batches:
            break
    return batches


def keys_of(batches) -> list[str]:
    return [k for b in batches for k in b.keys]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    splits = make_dataset(root, {"train": 8, "test": 7}, maxcount=2, odd_shapes=True)
    return root, splits, read_dataset(str(root))


# --- writing and metadata ------------------------------------------------------------------------


def test_split_writer_numbers_and_counts_shards(dataset):
    root, splits, _ = dataset
    assert splits["test"] == [
        ("test/test-000000.tar", 2),
        ("test/test-000001.tar", 2),
        ("test/test-000002.tar", 2),
        ("test/test-000003.tar", 1),
    ]
    assert [n for _, n in splits["train"]] == [2, 2, 2, 2]
    # each tar holds exactly __key__.jpg and __key__.labels.json per sample
    with tarfile.open(root / "test" / "test-000003.tar") as tar:
        assert sorted(tar.getnames()) == ["test0006.jpg", "test0006.labels.json"]
        record = json.loads(tar.extractfile("test0006.labels.json").read())
    assert record == {"pos": sample_labels(6)[0], "neg": sample_labels(6)[1]}


def test_split_writer_rejects_unencoded_fields(tmp_path):
    with SplitWriter(str(tmp_path), "x") as writer:
        with pytest.raises(TypeError, match="k0"):
            writer.write("k0", {"jpg": np.zeros((2, 2, 3), np.uint8)})


def test_read_dataset_round_trip(dataset):
    root, splits, info = dataset
    assert info.name == "tiny" and info.kind == "image"
    assert info.num_labels == NUM_LABELS
    assert [lab.role for lab in info.labels] == ROLES
    assert [lab.id for lab in info.labels] == [f"id{j}" for j in range(NUM_LABELS)]
    assert [lab.name for lab in info.labels] == [f"name {j}" for j in range(NUM_LABELS)]
    np.testing.assert_array_equal(info.seen, [0, 1, 3, 5])
    np.testing.assert_array_equal(info.unseen, [2, 4])
    assert info.embeddings.dtype == np.float32 and info.embeddings.shape == (NUM_LABELS, 5)
    np.testing.assert_array_equal(info.embeddings, np.arange(30).reshape(6, 5))
    assert set(info.splits) == {"train", "test"}
    for split in ("train", "test"):
        shards = info.shards(split)
        assert [s.samples for s in shards] == [n for _, n in splits[split]]
        assert [s.url for s in shards] == [f"{root}/{p}" for p, _ in splits[split]]
    meta = json.loads((root / "dataset.json").read_text())
    assert meta["num_seen"] == 4 and meta["num_unseen"] == 2 and meta["embedding_dim"] == 5
    assert meta["splits"]["test"]["samples"] == 7 and meta["note"] == "test"
    assert (root / "labels.tsv").read_text().splitlines()[0] == "index\tid\tname\trole"


def test_read_dataset_accepts_file_url(dataset):
    root, _, _ = dataset
    info = read_dataset(f"file://{root}")
    assert info.num_labels == NUM_LABELS
    assert len(collect(ShardStream(spec_for(info)))) == 3  # 7 samples, batches of 3, last partial


# --- read_dataset errors name the file -----------------------------------------------------------


@pytest.fixture
def small_root(tmp_path):
    make_dataset(tmp_path, {"test": 2}, maxcount=2)
    return tmp_path


def test_missing_dataset_json_named(small_root):
    (small_root / "dataset.json").unlink()
    with pytest.raises(DatasetError, match="dataset.json"):
        read_dataset(str(small_root))


def test_missing_root_named(tmp_path):
    with pytest.raises(DatasetError, match=r"nowhere/dataset\.json"):
        read_dataset(str(tmp_path / "nowhere"))


def test_invalid_dataset_json_named(small_root):
    (small_root / "dataset.json").write_text("{not json")
    with pytest.raises(DatasetError, match="dataset.json"):
        read_dataset(str(small_root))


def test_bad_labels_tsv_header_named(small_root):
    path = small_root / "labels.tsv"
    path.write_text(path.read_text().replace("index\tid\tname\trole", "idx\tid\tname\trole", 1))
    with pytest.raises(DatasetError, match="labels.tsv") as exc:
        read_dataset(str(small_root))
    assert str(path) in str(exc.value)


def test_bad_labels_tsv_row_named_with_line(small_root):
    path = small_root / "labels.tsv"
    lines = path.read_text().splitlines()
    lines[3] = lines[3].replace("unseen", "maybe")  # labels.tsv line 4 = label 2
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetError, match=r"labels\.tsv:4"):
        read_dataset(str(small_root))


def test_missing_labels_tsv_named(small_root):
    (small_root / "labels.tsv").unlink()
    with pytest.raises(DatasetError, match="labels.tsv"):
        read_dataset(str(small_root))


def test_embeddings_row_count_mismatch_named(small_root):
    np.save(small_root / "embeddings.npy", np.zeros((NUM_LABELS + 1, 5), np.float32))
    with pytest.raises(DatasetError, match="embeddings.npy") as exc:
        read_dataset(str(small_root))
    assert "labels.tsv" in str(exc.value)  # says what it should match


def test_pickled_embeddings_refused_and_named(small_root):
    np.save(small_root / "embeddings.npy", np.array([{"a": 1}] * NUM_LABELS, dtype=object), allow_pickle=True)
    with pytest.raises(DatasetError, match="embeddings.npy"):
        read_dataset(str(small_root))


def test_unknown_split_named(small_root):
    info = read_dataset(str(small_root))
    with pytest.raises(DatasetError, match="dataset.json") as exc:
        info.shards("validation")
    assert "validation" in str(exc.value) and "test" in str(exc.value)


def test_split_without_shards_named(small_root):
    meta = json.loads((small_root / "dataset.json").read_text())
    meta["splits"]["test"] = {"samples": 2}
    (small_root / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(DatasetError, match="dataset.json"):
        read_dataset(str(small_root))


# --- streaming: evaluation (one pass) --------------------------------------------------------------


def test_eval_stream_yields_every_sample_once_with_labels_and_images(dataset):
    _, _, info = dataset
    batches = collect(ShardStream(spec_for(info)))
    assert [len(b.keys) for b in batches] == [3, 3, 1]  # the last partial batch is kept
    assert keys_of(batches) == [f"test{i:04d}" for i in range(7)]  # shard order as listed, no shuffle
    for b in batches:
        assert isinstance(b, Batch) and b.has_samples
        assert b.skipped == []
        assert b.images.dtype == torch.uint8
        assert tuple(b.images.shape) == (len(b.keys), SIZE, SIZE, 3)
        assert b.labels.dtype == torch.int8
        assert tuple(b.labels.shape) == (len(b.keys), NUM_LABELS)
        for key, y in zip(b.keys, b.labels.numpy()):
            i = int(key[4:])
            np.testing.assert_array_equal(y, expected_vector(i))
            assert set(np.unique(y)) <= {-1, 0, 1}
    labels = np.concatenate([b.labels.numpy() for b in batches])
    assert (labels == 1).any() and (labels == -1).any() and (labels == 0).any()


def _colour(pixels: np.ndarray) -> str:
    mean = pixels.reshape(-1, 3).mean(axis=0)
    return min(COLOURS, key=lambda c: np.abs(mean - np.array(COLOURS[c])).sum())


def test_square_image_kept_and_non_square_resized_then_centre_cropped(dataset):
    _, _, info = dataset
    by_key = {}
    for b in collect(ShardStream(spec_for(info))):
        for key, image in zip(b.keys, b.images.numpy()):
            by_key[key] = image.astype(int)
    # a square image at the target size: colour (0, 100, 200) survives JPEG closely
    assert np.abs(by_key["test0000"] - np.array([0, 100, 200])).max() <= 12
    # 96 x 32 (w x h): short side to 16 -> 48 x 16, centre crop = scaled columns 16..32 =
    # source columns 32..64: red (source < 40) | green | blue (source >= 56) as columns 0..4 | 4..12 | 12..16.
    # A crop without the resize would be all green; a squash without the crop a third of each.
    for key in ("test0001", "test0004"):
        image = by_key[key]
        assert image.shape == (SIZE, SIZE, 3)
        assert _colour(image[:, 0]) == "red", key
        assert _colour(image[:, 6:10]) == "green", key
        assert _colour(image[:, 15]) == "blue", key
        assert np.abs(image[:, 6:10] - np.array(COLOURS["green"])).max() < 40
    # the portrait 32 x 96: the same along the rows
    for key in ("test0002", "test0005"):
        image = by_key[key]
        assert image.shape == (SIZE, SIZE, 3)
        assert _colour(image[0]) == "red", key
        assert _colour(image[6:10]) == "green", key
        assert _colour(image[15]) == "blue", key
        assert np.abs(image[6:10] - np.array(COLOURS["green"])).max() < 40


def test_non_square_png_larger_than_target(tmp_path):
    """A PNG (lossless) 40 x 24 to 12: scale 0.5 -> 20 x 12, crop scaled columns 4..16 = source 8..32."""
    from io import BytesIO

    from PIL import Image

    image = np.zeros((24, 40, 3), np.uint8)
    image[:, 4:36] = 255  # black only in the outer 4 columns: cropped away (a squash would keep them)
    buf = BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    with SplitWriter(str(tmp_path), "test") as writer:
        writer.write("a", {"png": buf.getvalue(), "labels.json": encode_labels([0], [])})
    labels = [Label(0, "x", "x", "seen"), Label(1, "y", "y", "unseen")]  # a dataset needs one of each
    write_metadata(str(tmp_path), "png", "image", labels, np.ones((2, 2)), {"test": writer.shards})
    info = read_dataset(str(tmp_path))
    (batch,) = collect(ShardStream(StreamSpec(info.shards("test"), 1, 12, 4, train=False)))
    assert tuple(batch.images.shape) == (1, 12, 12, 3)
    assert batch.images.numpy().min() >= 250
    np.testing.assert_array_equal(batch.labels.numpy(), [[1]])


def test_eval_split_over_two_ranks_is_disjoint_and_complete(dataset):
    _, _, info = dataset
    per_rank = [keys_of(collect(ShardStream(spec_for(info, rank=r, world=2)))) for r in range(2)]
    assert not set(per_rank[0]) & set(per_rank[1])
    assert sorted(per_rank[0] + per_rank[1]) == [f"test{i:04d}" for i in range(7)]
    assert len(per_rank[0] + per_rank[1]) == 7  # no padding, no duplicates
    shards = info.shards("test")
    assert len(per_rank[0]) == sum(s.samples for s in shards[0::2])
    assert len(per_rank[1]) == sum(s.samples for s in shards[1::2])


def test_eval_split_over_more_ranks_than_shards(dataset):
    _, _, info = dataset
    per_rank = [keys_of(collect(ShardStream(spec_for(info, rank=r, world=6)))) for r in range(6)]
    assert sorted(k for keys in per_rank for k in keys) == [f"test{i:04d}" for i in range(7)]
    assert per_rank[4] == [] and per_rank[5] == []


def test_eval_loader_with_two_processes_is_disjoint_and_complete(dataset):
    _, _, info = dataset
    keys = keys_of(collect(make_loader(spec_for(info), loader_workers=2)))
    assert sorted(keys) == [f"test{i:04d}" for i in range(7)]


def test_loader_processes_start_from_the_fork_server(dataset):
    # A process forked from one with threads (a Ray Train worker) can inherit a lock held for good.
    _, _, info = dataset
    loader = iter(make_loader(spec_for(info, "train", train=True), loader_workers=2))
    next(loader), next(loader)  # batches come from the loader processes in turn: both are up
    me = psutil.Process()
    loaders = [p for p in me.children(recursive=True) if p.name() == "pt_data_worker"]
    assert len(loaders) == 2 and all(p.ppid() != me.pid for p in loaders)
    del loader


# --- streaming: training (endless, reshuffled per epoch) -----------------------------------------


def test_train_shard_order_is_deterministic_per_seed_and_epoch(dataset):
    _, _, info = dataset
    spec = spec_for(info, "train", train=True, seed=5)
    for epoch in range(4):
        assert epoch_shards(spec, epoch) == epoch_shards(spec_for(info, "train", train=True, seed=5), epoch)
        assert sorted(s.url for s in epoch_shards(spec, epoch)) == sorted(s.url for s in info.shards("train"))
    orders = {tuple(s.url for s in epoch_shards(spec, e)) for e in range(6)}
    assert len(orders) > 1  # reshuffled across epochs
    other = {tuple(s.url for s in epoch_shards(spec_for(info, "train", train=True, seed=6), e)) for e in range(6)}
    assert other != orders  # and depends on the seed
    # evaluation keeps the listed order
    assert epoch_shards(spec_for(info, "train", train=False), 3) == info.shards("train")


def test_train_stream_is_deterministic_and_endless(dataset):
    _, _, info = dataset
    n_batches = 9  # 27 samples from an 8-sample split
    runs = [
        keys_of(collect(ShardStream(spec_for(info, "train", train=True, seed=3, shuffle_buffer=4)), n_batches))
        for _ in range(2)
    ]
    assert runs[0] == runs[1]
    assert len(runs[0]) == 27
    all_keys = {f"train{i:04d}" for i in range(8)}
    assert set(runs[0]) == all_keys
    # every epoch covers the split exactly once: the first 3 epochs are permutations of it
    for epoch in range(3):
        assert sorted(runs[0][epoch * 8 : (epoch + 1) * 8]) == sorted(all_keys)
    assert runs[0][:8] != runs[0][8:16] or runs[0][8:16] != runs[0][16:24]  # reshuffled


def test_train_stream_batches_are_full(dataset):
    _, _, info = dataset
    batches = collect(ShardStream(spec_for(info, "train", train=True, batch_size=5)), 6)
    assert [len(b.keys) for b in batches] == [5] * 6
    for b in batches:
        assert tuple(b.images.shape) == (5, SIZE, SIZE, 3)
        for key, y in zip(b.keys, b.labels.numpy()):
            np.testing.assert_array_equal(y, expected_vector(int(key[5:])))


def test_train_ranks_take_disjoint_shards_each_epoch(dataset):
    _, _, info = dataset
    per_rank = [
        keys_of(collect(ShardStream(spec_for(info, "train", train=True, seed=1, rank=r, world=2, batch_size=4)), 1))
        for r in range(2)
    ]
    # 8 samples in 4 shards of 2: each rank's first epoch is its 2 shards = 4 samples = 1 batch
    assert not set(per_rank[0]) & set(per_rank[1])
    assert sorted(per_rank[0] + per_rank[1]) == [f"train{i:04d}" for i in range(8)]


def test_train_stream_of_a_rank_without_shards_ends(dataset):
    _, _, info = dataset
    spec = spec_for(info, "test", train=True, rank=5, world=6)  # 4 shards, rank 5 gets none
    assert collect(ShardStream(spec), 3) == []
