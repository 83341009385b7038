"""Small Open Images and NUS-WIDE releases in their exact file formats, shared by the converter
tests (tests/test_convert_openimages.py, tests/test_convert_nuswide.py) and the training test on
the converted data (tests/integration/test_train_real_formats.py)."""

import csv
import hashlib
import io
from pathlib import Path

import numpy as np
from PIL import Image

# --- Open Images v4 -------------------------------------------------------------------------------

SEEN = [
    ("/m/s0", "Dog"),
    ("/m/s1", "Swimming pool"),
    ("/m/s2", "Isle of man tt"),
    ("/m/s3", "Red car"),
    ("/m/s4", "Tree"),
]
UNSEEN = [("/m/u0", "Fauna"), ("/m/u1", "Dirt track racing"), ("/m/u2", "Boeing 767")]
OUTSIDE = [("/m/x0", "Flora")]  # in class-descriptions, in neither list; /m/x1 is nowhere
TOKENS = "dog swimming pool isle of man tt red car tree fauna dirt track racing boeing 767".split()
INDEX = {mid: i for i, (mid, _) in enumerate(SEEN + UNSEEN)}


def image_id(name: str) -> str:
    return hashlib.md5(name.encode()).hexdigest()[:16]


def jpeg(size, colour=(120, 80, 40), exif_orientation=None) -> bytes:
    image = Image.new("RGB", size, colour)
    if exif_orientation:
        # Left half red, right half blue as stored; orientation 6 = rotate 90 degrees clockwise to
        # display, so the displayed image is portrait with red on top.
        image.paste((255, 0, 0), (0, 0, size[0] // 2, size[1]))
        image.paste((0, 0, 255), (size[0] // 2, 0, size[0], size[1]))
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        buf = io.BytesIO()
        image.save(buf, "JPEG", quality=95, exif=exif.tobytes())
        return buf.getvalue()
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def make_openimages(root: Path, n_train: int = 14, n_val: int = 5, n_test: int = 5) -> dict:
    """Write the release files; return the rows written and the special image ids."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    with open(root / "class-descriptions.csv", "w", newline="") as f:
        csv.writer(f).writerows(SEEN + UNSEEN + OUTSIDE + [("/m/zz", 'Name, with "comma"')])
    (root / "seen.txt").write_text("".join(mid + "\n" for mid, _ in SEEN))
    (root / "unseen.tsv").write_text(
        "index\tmid\tname\n" + "".join(f"{i}\t{mid}\t{name}\n" for i, (mid, name) in enumerate(UNSEEN))
    )
    vecs = rng.standard_normal((len(TOKENS), 4)).round(4)
    (root / "glove.4d.txt").write_text("".join(f"{t} {' '.join(map(str, v))}\n" for t, v in zip(TOKENS, vecs)))

    special = {
        name: image_id(name)
        for name in (
            "far",
            "unseen_only",
            "oov_only",
            "missing",
            "corrupt",
            "exif",
            "small",
            "conflict",
            "val_oov_only",
            "test_missing",
        )
    }
    rows = {"train": [], "validation": [], "test": []}
    files = {}
    for split, count in (("train", n_train), ("validation", n_val), ("test", n_test)):
        for i in range(count):
            iid = image_id(f"{split}{i}")
            for mid in rng.choice([m for m, _ in SEEN + UNSEEN], size=3, replace=False):
                rows[split].append([iid, "verification", mid, str(int(rng.random() < 0.5))])
            files[iid] = jpeg((320, 240), tuple(int(c) for c in rng.integers(0, 255, 3)))
    t = rows["train"]
    far = special["far"]
    t.insert(0, [far, "verification", "/m/s0", "1"])
    t.insert(1, [far, "crowdsource-verification", "/m/x1", "1"])  # outside the vocabulary
    t.append([far, "verification", "/m/s3", "0"])
    t.append([far, "verification", "/m/u2", "1"])
    t += [
        [special["unseen_only"], "verification", "/m/u0", "1"],
        [special["oov_only"], "verification", "/m/x0", "1"],
        [special["missing"], "verification", "/m/s1", "1"],
        [special["corrupt"], "verification", "/m/s2", "1"],
        [special["exif"], "verification", "/m/s4", "1"],
        [special["small"], "verification", "/m/s0", "0"],
        [special["conflict"], "verification", "/m/s1", "1"],
        [special["conflict"], "crowdsource-verification", "/m/s1", "0"],
        [special["conflict"], "verification", "/m/s2", "0"],
    ]
    rows["validation"].append([special["val_oov_only"], "verification", "/m/x0", "0"])
    rows["test"].append([special["test_missing"], "verification", "/m/u1", "1"])
    for key in ("far", "unseen_only", "oov_only", "conflict", "val_oov_only"):
        files[special[key]] = jpeg((300, 300))
    files[special["corrupt"]] = b"\xff\xd8\xff\xe0 this is not really a jpeg" + bytes(200)
    files[special["exif"]] = jpeg((400, 300), exif_orientation=6)
    files[special["small"]] = jpeg((100, 80))
    for iid, data in files.items():
        (root / "images" / f"{iid}.jpg").write_bytes(data)
    for split, split_rows in rows.items():
        with open(root / f"{split}-annotations-human-imagelabels.csv", "w", newline="") as f:
            w = csv.writer(f, lineterminator="\n")
            w.writerow(["ImageID", "Source", "LabelName", "Confidence"])
            w.writerows(split_rows)
    return {"rows": rows, "special": special, "vectors": dict(zip(TOKENS, vecs))}


# --- NUS-WIDE -------------------------------------------------------------------------------------

FOLDERS = ["actor", "airport", "animal", "beach"]


def noisy_jpeg(rng, size=(160, 120)) -> bytes:
    buf = io.BytesIO()  # noise, so the file is well above LESA's 4,000-byte floor
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def make_nuswide(root: Path, tags: list[str], concepts: list[str], n_images: int = 16, seed: int = 0) -> dict:
    """The release layout: ImageList/, NUS_WID_Tags/, Concepts81.txt, AllLabels/, Flickr/."""
    rng = np.random.default_rng(seed)
    for d in ("ImageList", "NUS_WID_Tags", "AllLabels", "Flickr"):
        (root / d).mkdir(parents=True, exist_ok=True)
    names = [f"{FOLDERS[i % 4]}/{i:04d}_{2124494179 + i}.jpg" for i in range(n_images)]
    # Imagelist.txt lists full Windows paths; the split lists use folder\file.
    (root / "ImageList" / "Imagelist.txt").write_text(
        "".join("C:\\ImageData\\Flickr\\" + n.replace("/", "\\") + "\r\n" for n in names)
    )
    train, test = names[: n_images * 5 // 8], names[n_images * 5 // 8 :]
    (root / "ImageList" / "TrainImagelist.txt").write_text("".join(n.replace("/", "\\") + "\r\n" for n in train))
    (root / "ImageList" / "TestImagelist.txt").write_text("".join(n.replace("/", "\\") + "\r\n" for n in test))
    (root / "NUS_WID_Tags" / "TagList1k.txt").write_text("".join(t + "\n" for t in tags))
    (root / "Concepts81.txt").write_text("".join(c + "\n" for c in concepts))
    tag_values = (rng.random((n_images, len(tags))) < 0.3).astype(int)
    concept_values = (rng.random((n_images, len(concepts))) < 0.3).astype(int)
    # AllTags1k: tab-separated with a trailing tab, CRLF (the parser in LESA drops the last 2 chars).
    (root / "NUS_WID_Tags" / "AllTags1k.txt").write_text(
        "".join("\t".join(map(str, row)) + "\t\r\n" for row in tag_values)
    )
    for k, c in enumerate(concepts):
        (root / "AllLabels" / f"Labels_{c}.txt").write_text("".join(f"{v}\n" for v in concept_values[:, k]))
    placeholder = noisy_jpeg(np.random.default_rng(99))
    (root / "placeholder.jpg").write_bytes(placeholder)
    files = {}
    for n in names:
        files[n] = noisy_jpeg(rng)
    files[names[1]] = placeholder  # Flickr's "photo unavailable"
    files[names[2]] = files[names[2]][:3000]  # at most 4,000 bytes: LESA drops it
    del files[names[-1]]  # missing (a test image)
    for n, data in files.items():
        (root / "Flickr" / n).parent.mkdir(exist_ok=True)
        (root / "Flickr" / n).write_bytes(data)
    return {"names": names, "train": train, "test": test, "tag_values": tag_values, "concept_values": concept_values}


def write_glove(path: Path, words, dim: int = 4, seed: int = 0) -> dict[str, np.ndarray]:
    """A GloVe text file (`word v1 ... vd` per line) with a random vector for every word."""
    vecs = np.random.default_rng(seed).standard_normal((len(words), dim)).round(4)
    path.write_text("".join(f"{w} {' '.join(map(str, v))}\n" for w, v in zip(words, vecs)))
    return dict(zip(words, vecs))
