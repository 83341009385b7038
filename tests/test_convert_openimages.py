"""`lesa convert openimages`: a small Open Images in the exact release formats, converted with Ray.

The fixture (tests/fixtures_release.py) holds the cases that matter at scale: an image whose rows sit at both ends of the CSV,
rows for MIDs outside the vocabulary, a train image with no seen annotation, a missing image file,
a corrupt JPEG, an EXIF-rotated image, an image smaller than the target size, and a label verified
both present and absent.
"""

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from fixtures_release import INDEX, SEEN, UNSEEN, image_id, make_openimages
from PIL import Image

from datasets.contract import DatasetError, read_dataset
from datasets.makers.convert import ImageOptions
from datasets.makers.openimages import convert_openimages, read_annotations, read_mid_list
from launch.cli import main

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def expected_labels(rows) -> dict[str, tuple[list[int], list[int]]]:
    """Reference: per image, pos = labels with a Confidence-1 row, neg = Confidence-0 rows minus pos."""
    pos, neg = {}, {}
    for iid, _, mid, conf in rows:
        pos.setdefault(iid, set()), neg.setdefault(iid, set())
        if mid in INDEX:
            (pos if conf == "1" else neg)[iid].add(INDEX[mid])
    return {iid: (sorted(pos[iid]), sorted(neg[iid] - pos[iid])) for iid in pos}


def read_split(root: Path, split: str) -> dict[str, tuple[dict, Image.Image]]:
    samples = {}
    for tar_path in sorted((root / split).glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        for name, data in members.items():
            key, ext = name.split(".", 1)
            if ext == "labels.json":
                samples[key] = (json.loads(data), Image.open(io.BytesIO(members[f"{key}.jpg"])))
    return samples


def convert(src: Path, out: Path, **kwargs) -> dict:
    return convert_openimages(
        str(out),
        descriptions=str(src / "class-descriptions.csv"),
        seen=str(src / "seen.txt"),
        unseen=str(src / "unseen.tsv"),
        annotations=str(src),
        images=str(src / "images"),
        vectors=str(src / "glove.4d.txt"),
        shard_size=4,
        log=lambda m: None,
        **kwargs,
    )


@pytest.mark.integration
def test_convert_with_ray(tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    src, out = tmp_path / "oi", tmp_path / "dataset"
    fx = make_openimages(src)
    sp = fx["special"]
    report = convert(src, out, num_cpus=2)

    info = read_dataset(str(out))
    assert [(lab.id, lab.name, lab.role) for lab in info.labels] == (
        [(m, n, "seen") for m, n in SEEN] + [(m, n, "unseen") for m, n in UNSEEN]
    )
    v = fx["vectors"]
    np.testing.assert_allclose(info.embeddings[1], (v["swimming"] + v["pool"]) / 2, rtol=1e-5)
    np.testing.assert_allclose(info.embeddings[7], (v["boeing"] + v["767"]) / 2, rtol=1e-5)

    split_names = {"train": "train", "val": "validation", "test": "test"}
    for split, oi_name in split_names.items():
        reference = expected_labels(fx["rows"][oi_name])
        samples = read_split(out, split)
        gone = {sp["missing"], sp["corrupt"], sp["unseen_only"], sp["oov_only"], sp["test_missing"]}
        assert set(samples) == set(reference) - gone, split
        for key, (labels, _) in samples.items():
            assert (labels["pos"], labels["neg"]) == reference[key], key
        assert sum(s.samples for s in info.shards(split)) == len(samples)

    train = read_split(out, "train")
    # Hand count: rows at both ends of the file are merged; /m/x1 is ignored.
    assert train[sp["far"]][0] == {"pos": [INDEX["/m/s0"], INDEX["/m/u2"]], "neg": [INDEX["/m/s3"]]}
    assert train[sp["conflict"]][0] == {"pos": [INDEX["/m/s1"]], "neg": [INDEX["/m/s2"]]}
    exif = train[sp["exif"]][1]
    assert exif.size == (256, 341)  # portrait after orientation 6
    top, bottom = exif.getpixel((128, 20)), exif.getpixel((128, 320))
    assert top[0] > 200 and top[2] < 60 and bottom[2] > 200  # red on top, as displayed
    assert train[sp["small"]][1].size == (100, 80)  # never upscaled
    assert train[image_id("train0")][1].size == (320, 240)  # short side under 256: kept
    assert train[sp["far"]][1].size == (256, 256)
    val = read_split(out, "val")
    assert val[sp["val_oov_only"]][0] == {"pos": [], "neg": []}  # kept: val/test keep every image

    rep = report["splits"]
    assert rep["train"]["skipped"]["missing"] == {"count": 1, "examples": [sp["missing"]]}
    assert rep["train"]["skipped"]["unreadable"]["count"] == 1
    assert rep["train"]["skipped"]["unreadable"]["examples"][0][0] == sp["corrupt"]
    assert rep["test"]["skipped"]["missing"]["examples"] == [sp["test_missing"]]
    assert rep["train"]["written"] == len(train) and rep["train"]["planned"] == len(train) + 2
    train_csv = next(
        v for k, v in report["annotations"].items() if k.endswith("/train-annotations-human-imagelabels.csv")
    )
    assert train_csv["rows_outside_vocabulary"]["count"] == 2
    assert sorted(train_csv["rows_outside_vocabulary"]["examples"]) == ["/m/x0", "/m/x1"]
    assert train_csv["images_without_seen_label"] == 2
    assert json.loads((out / "convert_report.json").read_text())["splits"] == rep

    # A rerun finds every shard complete and starts nothing (no Ray).
    again = convert(src, out, use_ray=False)
    assert all(r["shards_reused"] == r["shards"] for r in again["splits"].values())
    assert again["splits"]["train"]["written"] == rep["train"]["written"]


def test_rerun_rewrites_only_unfinished_shards(tmp_path):
    src, out = tmp_path / "oi", tmp_path / "dataset"
    make_openimages(src, n_train=6, n_val=2, n_test=2)
    first = convert(src, out, use_ray=False, splits=("train",))
    shards = first["splits"]["train"]["shards"]
    assert shards >= 3
    # Shard 1 was "interrupted": its marker never written, a temp file left behind.
    (out / "_convert" / "train-000001.json").unlink()
    (out / "train" / "train-000001.tar.tmp-dead").write_bytes(b"partial")
    before = (out / "train" / "train-000002.tar").stat().st_mtime_ns
    second = convert(src, out, use_ray=False, splits=("train",))
    assert second["splits"]["train"]["shards_reused"] == shards - 1
    assert (out / "train" / "train-000002.tar").stat().st_mtime_ns == before
    assert second["splits"]["train"]["written"] == first["splits"]["train"]["written"]
    assert not list((out / "train").glob("*.tmp-*"))
    # Other options change every shard's fingerprint: all are written again.
    third = convert(src, out, use_ray=False, splits=("train",), options=ImageOptions(short_side=128))
    assert third["splits"]["train"]["shards_reused"] == 0


def test_streaming_groups_rows_across_chunks(tmp_path):
    path = tmp_path / "train-annotations-human-imagelabels.csv"
    path.write_text(
        "ImageID,Source,LabelName,Confidence\n"
        "bbb,verification,/m/a,1\naaa,verification,/m/b,0\nccc,verification,/m/x,1\n"
        "aaa,verification,/m/a,1\nbbb,verification,/m/b,0.5\n\nbbb,verification\n"
        "aaa,verification,/m/b,1\n"
    )
    grouped, stats = read_annotations(str(path), {"/m/a": 0, "/m/b": 1}, chunk_rows=2)
    assert [i.decode() for i in grouped.image_ids] == ["aaa", "bbb", "ccc"]
    assert [p.tolist() for p in grouped.pos_neg(0)] == [[0, 1], []]  # b: 0 then 1 -> present
    assert [p.tolist() for p in grouped.pos_neg(1)] == [[0], []]
    assert [p.tolist() for p in grouped.pos_neg(2)] == [[], []]
    assert stats["rows"] == 7 and stats["bad_rows"]["count"] == 2
    assert stats["rows_outside_vocabulary"] == {"count": 1, "examples": ["/m/x"]}


def test_malformed_header_names_the_file(tmp_path):
    path = tmp_path / "test-annotations-human-imagelabels.csv"
    path.write_text("ImageID,Label,Conf\nabc,/m/a,1\n")
    with pytest.raises(DatasetError, match=r"test-annotations-human-imagelabels.csv: malformed header"):
        read_annotations(str(path), {})


def test_cli_convert_and_bad_input(tmp_path, capsys):
    src = tmp_path / "oi"
    make_openimages(src, n_train=3, n_val=1, n_test=1)
    args = [
        "convert",
        "openimages",
        "--class-descriptions",
        str(src / "class-descriptions.csv"),
        "--seen",
        str(src / "seen.txt"),
        "--unseen",
        str(src / "unseen.tsv"),
        "--annotations",
        str(src),
        "--images",
        str(src / "images"),
        "--vectors",
        str(src / "glove.4d.txt"),
        "--no-ray",
        "--image-size",
        "64",
        "--shard-size",
        "3",
    ]
    assert main(args + ["--out", str(tmp_path / "d")]) == 0
    out = capsys.readouterr().out
    assert "train:" in out and "missing 1" in out and "convert_report.json" in out
    assert read_dataset(str(tmp_path / "d")).splits["train"]
    assert max(read_split(tmp_path / "d", "test")[image_id("test0")][1].size) <= 86  # short side 64

    (src / "test-annotations-human-imagelabels.csv").write_text("ImageID;Source;LabelName;Confidence\n")
    assert main(args + ["--out", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err
    assert "lesa convert: error:" in err and "test-annotations-human-imagelabels.csv: malformed header" in err

    (src / "unseen.tsv").write_text("index\tmid\tname\n0\t/m/s0\tDog\n")
    assert main(args + ["--out", str(tmp_path / "f")]) == 2
    assert "share 1 MIDs" in capsys.readouterr().err


@pytest.mark.skipif(
    not (SHARED / "openimages-2018_04").exists(), reason="no real Open Images sample in a sibling shared/data"
)
def test_real_lesa_split_lists():
    oi = SHARED / "openimages-2018_04"
    seen = read_mid_list(str(oi / "openimages_seen_7186.tsv"))
    unseen = read_mid_list(str(oi / "openimages_unseen_400.tsv"))
    assert len(seen) == 7186 and len(unseen) == 400
    assert not set(seen) & set(unseen)
    from datasets.makers.openimages import build_vocabulary, read_class_descriptions

    names = read_class_descriptions(str(oi / "class-descriptions.csv"))
    assert len(names) == 19995
    assert all(m in names for m in seen + unseen)
    labels = build_vocabulary(
        str(oi / "openimages_seen_7186.tsv"), str(oi / "openimages_unseen_400.tsv"), str(oi / "class-descriptions.csv")
    )
    assert [lab.name for lab in labels[7186:7191]] == ["Fauna", "Flora", "Exercise", "Dirt track racing", "Nectar"]
    assert labels[1].name == "Isle of man tt"
