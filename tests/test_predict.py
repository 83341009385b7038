"""`lesa predict` through the CLI, on what `lesa train --out DIR` leaves: model.pt + config.json.

The model has random weights (training is not what is under test): DIR is built by hand from a
tiny synthetic dataset, and every printed score is checked against the model run directly.
"""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from datasets.contract import Label, write_metadata
from datasets.makers.synthetic import write_synthetic
from datasets.stream import decode_image
from launch.cli import main
from trainer.config import load_config
from trainer.evaluation.attention_maps import sheet_size
from trainer.models.registry import build_model

IMAGE_SIZE = 48
NUM_ATTENTIONS = 4
NUSWIDE = Path("/work/shared/data/nuswide")


def save_run(out: Path, data_url: str, embeddings: np.ndarray) -> torch.nn.Module:
    """What `lesa train --out` writes for predict: config.json and model.pt (a plain state dict)."""
    cfg = load_config(
        base={"data": {"url": data_url, "image_size": IMAGE_SIZE}, "model": {"num_attentions": NUM_ATTENTIONS}}
    )
    torch.manual_seed(0)
    model = build_model(cfg, embeddings)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg.to_dict()))
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, out / "model.pt")
    return model.eval()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(run dir, dataset root, model, images dir with two good pictures and one corrupt file)."""
    root = tmp_path_factory.mktemp("predict")
    data = root / "data"
    write_synthetic(str(data), seed=0, sizes={"test": 2}, image_size=IMAGE_SIZE, log=lambda *a: None)
    from datasets.contract import read_dataset

    info = read_dataset(str(data))
    model = save_run(root / "run", str(data), info.embeddings)
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    # Not square and not the model's size, so the resize + centre crop of training is exercised.
    Image.fromarray(rng.integers(0, 256, (60, 90, 3), dtype=np.uint8)).save(images / "wide.jpg")
    Image.fromarray(rng.integers(0, 256, (70, 50, 3), dtype=np.uint8)).save(images / "tall.png")
    (images / "broken.jpg").write_bytes(b"this is not a JPEG")
    return root / "run", info, model, images


def printed(stdout: str) -> dict[str, list[tuple[float, str]]]:
    """{image: [(score, label name), ...]} from predict's output."""
    out, current = {}, None
    for line in stdout.splitlines():
        m = re.match(r"^\s+(\d+)\s+(-?[\d.]+)\s+(.+?)\s+\[(\w+)\]$", line)
        if m:
            out[current].append((float(m.group(2)), m.group(3)))
        elif line and not line.startswith(" "):
            current = line
            out[current] = []
    return out


def expected_scores(model, path: Path, names_to_vectors=None) -> np.ndarray:
    image = np.array(decode_image(path.read_bytes(), IMAGE_SIZE))  # exactly what training does
    with torch.no_grad():
        if names_to_vectors is not None:
            model.label_vectors = torch.nn.functional.normalize(torch.as_tensor(names_to_vectors), dim=1)
        ids = torch.arange(model.label_vectors.shape[0])
        return model(torch.from_numpy(image[None]), ids).scores[0].numpy()


def test_top_k_for_each_good_image_and_the_corrupt_one_named(run, capsys):
    out_dir, info, model, images = run
    files = [images / "wide.jpg", images / "broken.jpg", images / "missing.jpg", images / "tall.png"]
    code = main(["predict", *map(str, files), "--checkpoint", str(out_dir), "--top-k", "5"])
    captured = capsys.readouterr()
    assert code == 0
    assert "broken.jpg" in captured.err and "missing.jpg" in captured.err
    results = printed(captured.out)
    assert list(results) == [str(images / "wide.jpg"), str(images / "tall.png")]
    names = [lab.name for lab in info.labels]
    for path, rows in results.items():
        assert len(rows) == 5
        scores = expected_scores(model, Path(path))
        best = np.argsort(-scores, kind="stable")[:5]
        assert [name for _, name in rows] == [names[k] for k in best]
        np.testing.assert_allclose([s for s, _ in rows], scores[best], atol=1e-3)


def test_a_tiff_photo_is_predicted_as_its_pixels_while_shards_refuse_tiff(run, tmp_path, capsys):
    """Users' photos may be TIFF: predict decodes the converters' formats (TIFF among them) and
    scores exactly the pixels training would see; a shard holding the same TIFF is a bad sample."""
    from datasets.images import BadSample

    out_dir, info, model, _ = run
    pixels = np.random.default_rng(5).integers(0, 256, (64, 80, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "scan.tif", compression="tiff_lzw")
    Image.fromarray(pixels).save(tmp_path / "same.png")  # the same pixels in a shard format
    with Image.open(tmp_path / "scan.tif") as check:
        assert check.format == "TIFF"
    with pytest.raises(BadSample) as exc:
        decode_image((tmp_path / "scan.tif").read_bytes(), IMAGE_SIZE)
    assert exc.value.kind == "unsupported image format"

    code = main(["predict", str(tmp_path / "scan.tif"), "--checkpoint", str(out_dir), "--top-k", "4"])
    captured = capsys.readouterr()
    assert code == 0 and "scan.tif" not in captured.err
    rows = printed(captured.out)[str(tmp_path / "scan.tif")]
    scores = expected_scores(model, tmp_path / "same.png")
    best = np.argsort(-scores, kind="stable")[:4]
    assert [name for _, name in rows] == [info.labels[k].name for k in best]
    np.testing.assert_allclose([s for s, _ in rows], scores[best], atol=1e-3)


def test_a_16_bit_png_and_a_turned_phone_photo_score_as_their_8_bit_upright_equivalents(run, tmp_path, capsys):
    """A 16-bit PNG is scored as its 8-bit levels (not as white), a JPEG with EXIF orientation 6 as
    the upright picture; the unreadable file's message names it and no PIL buffer."""
    from PIL import ImageOps

    out_dir, _, _, images = run
    levels = np.random.default_rng(7).integers(0, 256, (50, 70), dtype=np.uint8)
    Image.frombytes("I;16", (70, 50), (levels.astype("<u2") * 257).tobytes()).save(tmp_path / "deep.png")
    Image.fromarray(levels, "L").save(tmp_path / "levels.png")
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(np.random.default_rng(8).integers(0, 256, (60, 90, 3), dtype=np.uint8)).save(
        tmp_path / "phone.jpg", exif=exif.tobytes()
    )
    ImageOps.exif_transpose(Image.open(tmp_path / "phone.jpg")).save(tmp_path / "upright.png")
    files = ["deep.png", "levels.png", "phone.jpg", "upright.png"]
    code = main(["predict", *(str(tmp_path / f) for f in files), str(images / "broken.jpg")]
                + ["--checkpoint", str(out_dir), "--top-k", "8"])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0
    assert f"{images / 'broken.jpg'}: not a readable image" in captured.err and "BytesIO" not in captured.err
    rows = printed(captured.out)
    assert rows[str(tmp_path / "deep.png")] == rows[str(tmp_path / "levels.png")]
    assert rows[str(tmp_path / "phone.jpg")] == rows[str(tmp_path / "upright.png")]


def test_model_pt_path_works_as_well_as_its_folder(run, capsys):
    out_dir, _, _, images = run
    assert main(["predict", str(images / "wide.jpg"), "--checkpoint", str(out_dir / "model.pt"), "--top-k", "3"]) == 0
    assert len(printed(capsys.readouterr().out)[str(images / "wide.jpg")]) == 3


def test_labels_scores_only_those_and_names_the_unknown_one(run, capsys):
    out_dir, info, model, images = run
    wanted = ["red circle", "Blue Square", "purple unicorn"]  # the dataset's names match case-insensitively
    code = main(["predict", str(images / "wide.jpg"), "--checkpoint", str(out_dir), "--labels", *wanted])
    captured = capsys.readouterr()
    assert code == 0
    assert "purple unicorn" in captured.err
    rows = printed(captured.out)[str(images / "wide.jpg")]
    assert sorted(name for _, name in rows) == ["Blue Square", "red circle"]
    by_name = {lab.name: lab.index for lab in info.labels}
    full = expected_scores(model, images / "wide.jpg")
    for score, name in rows:
        assert score == pytest.approx(full[by_name[name.lower()]], abs=1e-3)


def test_nothing_predictable_exits_nonzero(run, capsys):
    out_dir, _, _, images = run
    assert main(["predict", str(images / "broken.jpg"), "--checkpoint", str(out_dir)]) == 1
    assert "broken.jpg" in capsys.readouterr().err
    assert main(["predict", str(images / "wide.jpg"), "--checkpoint", str(out_dir), "--labels", "zzyzx"]) == 1
    assert "zzyzx" in capsys.readouterr().err


def test_overlays_one_png_per_image(run, tmp_path, capsys):
    out_dir, _, _, images = run
    sheets = tmp_path / "sheets"
    code = main(
        [
            "predict",
            str(images / "wide.jpg"),
            str(images / "tall.png"),
            "--checkpoint",
            str(out_dir),
            "--top-k",
            "3",
            "--overlays",
            str(sheets),
        ]
    )
    assert code == 0
    assert sorted(p.name for p in sheets.iterdir()) == ["tall.png", "wide.png"]
    with Image.open(sheets / "wide.png") as sheet:
        assert sheet.format == "PNG" and sheet.size == sheet_size(NUM_ATTENTIONS, 3)
        sheet.load()


def test_missing_config_and_pickled_checkpoint_are_errors_naming_the_file(run, tmp_path, capsys):
    _, _, model, images = run
    bare = tmp_path / "bare"
    bare.mkdir()
    torch.save(model.state_dict(), bare / "model.pt")
    assert main(["predict", str(images / "wide.jpg"), "--checkpoint", str(bare)]) == 2
    assert "config.json" in capsys.readouterr().err

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((run[0] / "config.json").read_text())
    torch.save({"model": Label(0, "x", "x", "seen")}, pickled / "model.pt")  # an arbitrary object: refused
    assert main(["predict", str(images / "wide.jpg"), "--checkpoint", str(pickled)]) == 2
    assert str(pickled / "model.pt") in capsys.readouterr().err


@pytest.mark.skipif(not (NUSWIDE / "nuswide_tags1k_glove300.npy").exists(), reason="NUS-WIDE GloVe vectors absent")
def test_new_names_get_glove_vectors_through_the_label_encoder(tmp_path, capsys):
    """A model over 300-d GloVe label vectors: 'sky' comes from its dataset, 'sunset' from the
    NUS-WIDE GloVe rows (.npy + names), 'blue water' is the mean of 'blue' and 'water'."""
    tags = (NUSWIDE / "nuswide_tags1k.txt").read_text().split("\n")
    glove = np.load(NUSWIDE / "nuswide_tags1k_glove300.npy", allow_pickle=False).astype(np.float32)
    row = {name: i for i, name in enumerate(tags)}
    dataset_names = ["nature", "sky", "landscape", "light"]
    data = tmp_path / "data"
    write_metadata(
        str(data),
        "nus-mini",
        "image",
        [Label(i, n, n, "seen" if i < 3 else "unseen") for i, n in enumerate(dataset_names)],
        glove[[row[n] for n in dataset_names]],
        splits={},
    )
    model = save_run(tmp_path / "run", str(data), glove[[row[n] for n in dataset_names]])
    picture = tmp_path / "photo.jpg"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(picture)

    code = main(
        [
            "predict",
            str(picture),
            "--checkpoint",
            str(tmp_path / "run"),
            "--labels",
            "sky",
            "sunset",
            "blue water",
            "qqxqq",
            "--label-vectors",
            str(NUSWIDE / "nuswide_tags1k_glove300.npy"),
            "--label-vector-names",
            str(NUSWIDE / "nuswide_tags1k.txt"),
        ]
    )
    captured = capsys.readouterr()
    assert code == 0
    assert "qqxqq" in captured.err
    rows = dict((name, score) for score, name in printed(captured.out)[str(picture)])
    assert sorted(rows) == ["blue water", "sky", "sunset"]
    vectors = np.stack([glove[row["sky"]], glove[row["sunset"]], (glove[row["blue"]] + glove[row["water"]]) / 2])
    expected = expected_scores(model, picture, vectors)
    for name, score in zip(["sky", "sunset", "blue water"], expected):
        assert rows[name] == pytest.approx(score, abs=1e-3)


def test_a_model_pt_without_backbone_weights_needs_them_named(run, tmp_path, capsys):
    """A model trained on cached features saves no backbone; predict must be told its weights."""
    out_dir, _, model, images = run
    head_only = tmp_path / "head_only"
    head_only.mkdir()
    (head_only / "config.json").write_text((out_dir / "config.json").read_text())
    torch.save({k: v for k, v in model.state_dict().items() if not k.startswith("backbone.")}, head_only / "model.pt")
    assert main(["predict", str(images / "wide.jpg"), "--checkpoint", str(head_only)]) == 2
    err = capsys.readouterr().err
    assert str(head_only / "model.pt") in err and "model.backbone_weights" in err
