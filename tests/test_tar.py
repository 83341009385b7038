"""datasets/tar.py against Python's tarfile on the archives shards can be: WebDataset's writer,
every tar format, long names, empty members, directories, truncation and garbage."""

from __future__ import annotations

import io
import tarfile

import pytest
import webdataset as wds

from datasets.tar import TarError, iter_tar


def reference(data: bytes) -> list[tuple[str, bytes]]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r|*") as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar if m.isreg()]


def archive(fmt: int, members: list[tuple[str, bytes | None]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size, info.mtime = len(data), 1_700_000_000.5
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


MEMBERS = [
    ("a/", None),
    ("a/000001.jpg", b"\xff\xd8" + bytes(range(256)) * 3),
    ("a/000001.labels.json", b'{"pos": [1], "neg": []}'),
    ("a/empty.txt", b""),
    ("d" * 60 + "/" + "n" * 80 + ".jpg", b"long name with a ustar prefix"),
    ("x" * 150 + ".labels.json", b"name longer than any ustar field"),
    ("exact.bin", bytes(1024)),
]


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT])
def test_matches_tarfile_in_every_format(fmt):
    members = MEMBERS if fmt != tarfile.USTAR_FORMAT else [m for m in MEMBERS if len(m[0]) < 150]
    data = archive(fmt, members)
    assert list(iter_tar(io.BytesIO(data))) == reference(data)
    assert len(reference(data)) == len(members) - 1  # the directory is not a file


def test_matches_tarfile_on_webdataset_shards():
    buf = io.BytesIO()
    with wds.TarWriter(buf) as writer:
        for i in range(20):
            writer.write(
                {"__key__": f"img{i:07d}", "jpg": bytes([i]) * (100 + 37 * i), "labels.json": b'{"pos": [], "neg": []}'}
            )
    data = buf.getvalue()
    got = list(iter_tar(io.BytesIO(data)))
    assert got == reference(data) and len(got) == 40


def test_truncated_archive_is_an_eof_error_naming_the_member():
    data = archive(tarfile.PAX_FORMAT, MEMBERS)
    cut = data.index(b"\xff\xd8") + 100  # inside the first jpg's data
    with pytest.raises(EOFError, match="000001.jpg"):
        list(iter_tar(io.BytesIO(data[:cut])))
    # A cut inside a header ends the archive at the previous member, as tarfile does.
    whole = list(iter_tar(io.BytesIO(data)))
    third_header = data.index(b"a/000001.labels.json") // 512 * 512
    assert list(iter_tar(io.BytesIO(data[: third_header + 100]))) == whole[:1]


def test_garbage_is_rejected():
    with pytest.raises(TarError, match="checksum"):
        list(iter_tar(io.BytesIO(b"this is not a tar file" * 100)))


def test_empty_stream_has_no_members():
    assert list(iter_tar(io.BytesIO(b""))) == []
