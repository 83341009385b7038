"""`lesa convert nuswide`: a small NUS-WIDE release in its exact file formats (docs/datasets.md)."""

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from fixtures_release import make_nuswide

from datasets.contract import read_dataset
from datasets.makers.nuswide import convert_nuswide

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def read_split(root: Path, split: str) -> dict[str, dict]:
    samples = {}
    for tar_path in sorted((root / split).glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".labels.json"):
                    samples[m.name[: -len(".labels.json")]] = json.loads(tar.extractfile(m).read())
    return samples


def key_of(name: str) -> str:
    return name[: -len(".jpg")].replace("/", "_")


def test_convert_nuswide(tmp_path):
    tags = ["sky", "water", "beach", "animal", "blue", "sunset", "dog", "airport", "car", "tree"]
    concepts = ["airport", "animal", "beach", "fire", "whales"]  # 3 are tags, 2 are not
    fx = make_nuswide(tmp_path / "nus", tags, concepts)
    vocab = sorted(set(tags) | set(concepts))
    np.save(tmp_path / "v.npy", np.arange(len(vocab) * 3, dtype=np.float32).reshape(-1, 3))
    (tmp_path / "v.txt").write_text("\n".join(vocab) + "\n")
    out = tmp_path / "dataset"
    report = convert_nuswide(
        str(out),
        root=str(tmp_path / "nus"),
        vectors=str(tmp_path / "v.npy"),
        vector_names=str(tmp_path / "v.txt"),
        val_size=3,
        shard_size=4,
        placeholder=str(tmp_path / "nus" / "placeholder.jpg"),
        use_ray=False,
        log=lambda m: None,
    )

    info = read_dataset(str(out))
    seen = [t for t in tags if t not in concepts]
    assert [lab.name for lab in info.labels] == seen + concepts
    assert [lab.role for lab in info.labels] == ["seen"] * 7 + ["unseen"] * 5
    np.testing.assert_array_equal(info.embeddings[7], np.arange(3) + 3 * vocab.index("airport"))

    names = fx["names"]
    expected_splits = {"val": fx["train"][:3], "train": fx["train"][3:], "test": fx["test"]}
    dropped = {names[1], names[2], names[-1]}
    for split, members in expected_splits.items():
        samples = read_split(out, split)
        assert set(samples) == {key_of(n) for n in members if n not in dropped}, split
        for n in members:
            if n in dropped:
                continue
            row = names.index(n)
            values = np.concatenate([fx["tag_values"][row, [tags.index(t) for t in seen]], fx["concept_values"][row]])
            # Every label is annotated: 1 -> pos, 0 -> neg, nothing unknown.
            assert samples[key_of(n)] == {
                "pos": np.flatnonzero(values == 1).tolist(),
                "neg": np.flatnonzero(values == 0).tolist(),
            }
    skipped = {split: rep["skipped"] for split, rep in report["splits"].items()}
    assert skipped["val"]["placeholder"] == {"count": 1, "examples": [key_of(names[1])]}
    assert skipped["val"]["too_small"] == {"count": 1, "examples": [key_of(names[2])]}
    assert skipped["test"]["missing"] == {"count": 1, "examples": [key_of(names[-1])]}
    assert report["splits"]["train"]["written"] == len(fx["train"]) - 3


@pytest.mark.skipif(not (SHARED / "nuswide").exists(), reason="no real NUS-WIDE sample in a sibling shared/data")
def test_real_vocabulary_and_glove_vectors(tmp_path):
    """The real 1k tags and 81 concepts give 925 seen + 81 unseen labels, embedded with the exact
    GloVe rows LESA trained with (tag vectors first, concept vectors for the six concepts no tag has)."""
    nus = SHARED / "nuswide"
    tags = (nus / "nuswide_tags1k.txt").read_text().split()
    concepts = (nus / "nuswide_concepts81.txt").read_text().split()
    make_nuswide(tmp_path / "nus", tags, concepts, n_images=8)
    out = tmp_path / "dataset"
    convert_nuswide(
        str(out),
        root=str(tmp_path / "nus"),
        val_size=2,
        use_ray=False,
        log=lambda m: None,
        vectors=[str(nus / "nuswide_tags1k_glove300.npy"), str(nus / "nuswide_concepts81_glove300.npy")],
        vector_names=[str(nus / "nuswide_tags1k.txt"), str(nus / "nuswide_concepts81.txt")],
    )
    info = read_dataset(str(out))
    assert len(info.seen) == 925 and len(info.unseen) == 81
    tag_rows = np.load(nus / "nuswide_tags1k_glove300.npy")
    concept_rows = np.load(nus / "nuswide_concepts81_glove300.npy")
    seen = [t for t in tags if t not in set(concepts)]
    np.testing.assert_array_equal(info.embeddings[:925], tag_rows[[tags.index(t) for t in seen]])
    np.testing.assert_array_equal(info.embeddings[925:], concept_rows)
    sample = next(iter(read_split(out, "train").values()))
    assert len(sample["pos"]) + len(sample["neg"]) == 1006


def test_cli_with_precomputed_embeddings(tmp_path, capsys):
    from launch.cli import main

    tags, concepts = ["sky", "water", "beach"], ["beach", "fire"]
    make_nuswide(tmp_path / "nus", tags, concepts, n_images=8)
    emb = np.arange(12, dtype=np.float32).reshape(4, 3)  # sky, water, then beach, fire
    np.save(tmp_path / "emb.npy", emb)
    args = [
        "convert",
        "nuswide",
        "--root",
        str(tmp_path / "nus"),
        "--embeddings",
        str(tmp_path / "emb.npy"),
        "--val-size",
        "2",
        "--no-ray",
        "--out",
        str(tmp_path / "d"),
    ]
    assert main(args) == 0
    assert "too_small 1" in capsys.readouterr().out
    info = read_dataset(str(tmp_path / "d"))
    assert [lab.name for lab in info.labels] == ["sky", "water", "beach", "fire"]
    np.testing.assert_array_equal(info.embeddings, emb)
    np.save(tmp_path / "emb.npy", emb[:3])
    assert main(args) == 2
    assert "emb.npy: shape (3, 3), expected [4, dim]" in capsys.readouterr().err
