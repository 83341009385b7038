"""Label encoders (datasets/makers/embeddings.py): GloVe/word2vec text files, .npy + names, missing labels."""

import gzip
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from datasets.contract import DatasetError
from datasets.makers.embeddings import embed_labels, load_label_encoder, name_keys

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"

GLOVE = """the 1 0 0
of 0 1 0
man 0 0 1
Man 9 9 9
isle 1 1 0
tt 2 2 2
swimming 4 0 0
pool 0 4 0
new_york 7 7 7
t-shirt 3 3 3
boeing 1 2 3
767 3 2 1
"""


@pytest.fixture
def glove(tmp_path):
    path = tmp_path / "glove.3d.txt"
    path.write_text(GLOVE)
    return str(path)


def test_name_keys_split_and_lowercase():
    assert name_keys("Isle of Man TT") == (["isle of man tt", "isle_of_man_tt"], ["isle", "of", "man", "tt"])
    assert name_keys("salt_and-pepper/shaker")[1] == ["salt", "and", "pepper", "shaker"]
    assert name_keys("Mr. (Bean)")[1] == ["mr", "bean"]


def test_text_file_mean_of_tokens(glove):
    enc = load_label_encoder(glove)
    assert enc.dim == 3
    vecs, missing = enc.encode(["Isle of man tt", "Swimming pool", "MAN", "New York", "Boeing 767", "zzz qqq"])
    assert vecs.dtype == np.float32 and vecs.shape == (6, 3)
    np.testing.assert_allclose(vecs[0], np.mean([[1, 1, 0], [0, 1, 0], [0, 0, 1], [2, 2, 2]], axis=0))
    np.testing.assert_allclose(vecs[1], [2, 2, 0])
    np.testing.assert_allclose(vecs[2], [0, 0, 1])  # "man" comes first: the first of two keys wins
    np.testing.assert_allclose(vecs[3], [7, 7, 7])  # word2vec-style phrase token "new_york"
    np.testing.assert_allclose(vecs[4], [2, 2, 2])
    np.testing.assert_allclose(vecs[5], 0)
    assert missing == ["zzz qqq"]


def test_whole_name_before_tokens(glove):
    # "t-shirt" is a token of the file: used whole, not as the mean of "t" and "shirt".
    vecs, missing = load_label_encoder(glove).encode(["T-shirt"])
    np.testing.assert_allclose(vecs[0], [3, 3, 3])
    assert missing == []


def test_word2vec_header_and_gzip(tmp_path):
    path = tmp_path / "w2v.txt.gz"
    with gzip.open(path, "wt") as f:
        f.write("3 2\nhello 1 2\nworld 3 4\n2012 5 6\n")
    enc = load_label_encoder(str(path))
    assert enc.dim == 2
    vecs, missing = enc.encode(["Hello world", "2012"])
    np.testing.assert_allclose(vecs, [[2, 3], [5, 6]])
    assert missing == []


def test_streaming_keeps_only_asked_tokens(tmp_path):
    # 20,000 tokens x 50 dims (about 6 MB of text); encoding 3 names must not hold the file.
    rng = np.random.default_rng(0)
    path = tmp_path / "big.txt"
    rows = np.char.mod("%.5f", rng.standard_normal((20_000, 50)))
    path.write_text("".join(f"w{i} {' '.join(row)}\n" for i, row in enumerate(rows)))
    enc = load_label_encoder(str(path))
    assert enc.lookup({"w5", "w19999", "nope"}).keys() == {"w5", "w19999"}
    tracemalloc.start()
    vecs, missing = enc.encode(["w1 w2", "w19999", "absent"])
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert vecs.shape == (3, 50) and missing == ["absent"]
    assert peak < 2_000_000, f"encode held {peak} bytes"


def test_npy_and_names(tmp_path):
    np.save(tmp_path / "v.npy", np.arange(12, dtype=np.float32).reshape(4, 3))
    (tmp_path / "names.txt").write_text("sky\nBlue\nsea water\ncar\n")
    enc = load_label_encoder(str(tmp_path / "v.npy"), str(tmp_path / "names.txt"))
    vecs, missing = enc.encode(["blue sky", "Sea water", "boat"])
    np.testing.assert_allclose(vecs[0], [1.5, 2.5, 3.5])
    np.testing.assert_allclose(vecs[1], [6, 7, 8])  # a row named with a phrase is used whole
    assert missing == ["boat"]
    (tmp_path / "short.txt").write_text("sky\nblue\n")
    with pytest.raises(DatasetError, match="short.txt: 2 names but .*4 rows"):
        load_label_encoder(str(tmp_path / "v.npy"), str(tmp_path / "short.txt"))
    with pytest.raises(DatasetError, match="needs a names file"):
        load_label_encoder(str(tmp_path / "v.npy"))


def test_bad_sources(tmp_path):
    with pytest.raises(DatasetError, match="nothing.txt: word-vector file not found"):
        load_label_encoder(str(tmp_path / "nothing.txt"))
    (tmp_path / "prose.txt").write_text("this is not a vector file\n")
    with pytest.raises(DatasetError, match="prose.txt: not a word-vector text file"):
        load_label_encoder(str(tmp_path / "prose.txt"))
    np.save(tmp_path / "obj.npy", np.array(["a"], dtype=object), allow_pickle=True)
    (tmp_path / "n.txt").write_text("a\n")
    with pytest.raises(DatasetError, match="obj.npy: not a plain .npy array"):
        load_label_encoder(str(tmp_path / "obj.npy"), str(tmp_path / "n.txt"))


def test_missing_policies(glove):
    enc = load_label_encoder(glove)
    names = ["man", "swimming pool", "zzz", "qqq"]
    with pytest.raises(DatasetError, match=r"2 of 4 labels .*'zzz', 'qqq' \(use --missing random"):
        embed_labels(enc, names, missing="error")
    with pytest.raises(ValueError, match="missing must be one of"):  # a zero vector is refused later anyway
        embed_labels(enc, names, missing="zero")
    rand = embed_labels(enc, names, missing="random", log=lambda m: None)
    again = embed_labels(enc, names, missing="random", log=lambda m: None)
    np.testing.assert_array_equal(rand, again)  # deterministic in the name
    np.testing.assert_array_equal(rand[:2], enc.encode(names[:2])[0])  # found words keep their vectors
    mean_norm = np.linalg.norm(rand[:2], axis=1).mean()
    np.testing.assert_allclose(np.linalg.norm(rand[2:], axis=1), mean_norm, rtol=1e-5)
    assert not np.allclose(rand[2], rand[3])


@pytest.mark.skipif(not (SHARED / "nuswide").exists(), reason="no real NUS-WIDE sample in a sibling shared/data")
def test_real_nuswide_glove_rows():
    nus = SHARED / "nuswide"
    tags = (nus / "nuswide_tags1k.txt").read_text().split()
    concepts = (nus / "nuswide_concepts81.txt").read_text().split()
    tag_rows = np.load(nus / "nuswide_tags1k_glove300.npy")
    concept_rows = np.load(nus / "nuswide_concepts81_glove300.npy")
    seen = [t for t in tags if t not in set(concepts)]
    assert len(tags) == 1000 and len(concepts) == 81 and len(seen) == 925

    tag_enc = load_label_encoder(str(nus / "nuswide_tags1k_glove300.npy"), str(nus / "nuswide_tags1k.txt"))
    vecs, missing = tag_enc.encode(seen)
    assert missing == [] and tag_enc.dim == 300
    np.testing.assert_array_equal(vecs, tag_rows[[tags.index(t) for t in seen]])

    concept_enc = load_label_encoder(str(nus / "nuswide_concepts81_glove300.npy"), str(nus / "nuswide_concepts81.txt"))
    vecs81, missing = concept_enc.encode(concepts)
    assert missing == []
    np.testing.assert_array_equal(vecs81, concept_rows)
    # The 75 concepts that are also tags have the same vector in both files (docs/datasets.md);
    # the six others are not tags at all.
    overlap = [c for c in concepts if c in tags]
    assert len(overlap) == 75
    from_tags, missing = tag_enc.encode(concepts)
    assert sorted(missing) == ["computer", "fire", "map", "swimmers", "tattoo", "whales"]
    np.testing.assert_array_equal(
        from_tags[[concepts.index(c) for c in overlap]], concept_rows[[concepts.index(c) for c in overlap]]
    )


def test_wordllama_bundled_and_offline(monkeypatch):
    """The optional sentence encoder loads from its wheel with every network connection refused."""
    pytest.importorskip("wordllama")
    import socket

    def refuse(self, address, *args):
        raise OSError(f"network access attempted: {address}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    enc = load_label_encoder("wordllama")
    names = ["Dog", "Cat", "Boeing 767", "Airbus A320", "Fauna", "Flora"]
    vecs, missing = enc.encode(names)
    assert vecs.shape == (6, 256) and vecs.dtype == np.float32 and missing == []
    unit = vecs / np.linalg.norm(vecs, axis=1, keepdims=True)
    sim = unit @ unit.T
    np.fill_diagonal(sim, -1)
    assert [names[j] for j in sim.argmax(axis=1)] == ["Cat", "Dog", "Airbus A320", "Boeing 767", "Flora", "Fauna"]
    again, _ = load_label_encoder("wordllama").encode(["Dog"])
    np.testing.assert_array_equal(again[0], vecs[0])
