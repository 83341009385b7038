"""A minimal streaming tar reader for shards: (member name, bytes) of every regular file, in order.

Python's `tarfile` builds a TarInfo per header and parses every pax record into objects; for
shards of small members (a JPEG and a labels.json per sample, each behind a pax header) that
bookkeeping costs more than a tenth of the loader's time (docs/performance.md). This reader parses
only what a shard needs: the name (ustar prefix, pax `path`, GNU long name), the size (octal,
base-256 or pax `size`) and the type. Every header's checksum is verified, so garbage is an error
as with `tarfile`, and a short read is an EOFError naming the member it cut.

A shard is untrusted input: every malformed header ends the read with a TarError (a pax record
whose length is 0, negative, not a number or past its header; a negative size; a member over
MAX_MEMBER bytes, an extended header over MAX_EXTENDED), never a loop or an allocation the file
does not back: data is read in chunks of at most CHUNK bytes, so a size field of 8 GB in a small
file costs a chunk, not 8 GB (docs/reliability.md, Data path).
"""

from __future__ import annotations

BLOCK = 512
CHUNK = 1 << 20  # the most one read asks for; a member's bytes are only held once they arrived
MAX_MEMBER = 1 << 30  # a shard member (an image, a feature array) of more is refused, not read
MAX_EXTENDED = 1 << 20  # pax and GNU long-name headers hold a few names and numbers
REGULAR = (b"0", b"\0", b"7")  # regular file, old-style regular file, contiguous file
PAX_NEXT, PAX_GLOBAL, GNU_LONGNAME = b"x", b"g", b"L"


class TarError(ValueError):
    """A header that is not a valid tar header."""


class TruncatedMember(EOFError):
    """The archive ends inside a member's data; `name` is that member."""

    def __init__(self, name: str):
        super().__init__(f"unexpected end of data in {name}")
        self.name = name


def _octal(field: bytes, what: str) -> int:
    if field[:1] in (b"\x80", b"\xff"):  # base-256 (GNU) for values too large for octal
        value = int.from_bytes(field[1:], "big")
        return value - (1 << (8 * (len(field) - 1))) if field[:1] == b"\xff" else value
    text = field.split(b"\0", 1)[0].strip()
    try:
        return int(text, 8) if text else 0
    except ValueError:
        raise TarError(f"invalid {what} field {field!r}") from None


def _decimal(text: bytes, what: str) -> int:
    # int() would also take signs, underscores and spaces, and a digit string of any length.
    if not text.isdigit() or len(text) > 18:
        raise TarError(f"invalid {what} {text[:40]!r} in a pax header")
    return int(text)


def _checksum_ok(header: bytes) -> bool:
    stored = _octal(header[148:156], "checksum")
    unsigned = sum(header[:148]) + 8 * 32 + sum(header[156:])  # the field counts as 8 spaces
    return stored == unsigned


def _pax_records(data: bytes) -> dict[str, str]:
    """`length key=value\\n` records; only path and size matter here. Each record's length counts
    itself, so it is at least the 5 bytes of `5 k=\\n` and always moves on."""
    records, pos = {}, 0
    while pos < len(data) and data[pos : pos + 1] != b"\0":
        space = data.find(b" ", pos, pos + 20)
        if space < 0:
            raise TarError(f"pax record at byte {pos} has no length")
        length = _decimal(data[pos:space], "record length")
        end = pos + length
        if length < 5 or end > len(data) or data[end - 1 : end] != b"\n":
            raise TarError(f"pax record at byte {pos} has a bad length {length} (header of {len(data)} bytes)")
        key, eq, value = data[space + 1 : end - 1].partition(b"=")
        if not eq:
            raise TarError(f"pax record at byte {pos} has no '='")
        records[key.decode("utf-8", "replace")] = value.decode("utf-8", "surrogateescape")
        pos = end
    return records


def _read_exact(stream, size: int, name: str) -> bytes:
    """`size` bytes, asked for a chunk at a time: memory grows only with bytes that arrived."""
    if size <= CHUNK:
        data = stream.read(size)
    else:
        parts, got = [], 0
        while got < size:
            part = stream.read(min(CHUNK, size - got))
            if not part:
                break
            parts.append(part)
            got += len(part)
        data = b"".join(parts)
    if len(data) != size:
        raise TruncatedMember(name)
    return data


def _size(header: bytes, pax: dict | None) -> int:
    size = _decimal(pax["size"].encode("utf-8", "surrogateescape"), "size") if pax and "size" in pax else None
    if size is None:
        size = _octal(header[124:136], "size")
    if size < 0:
        raise TarError(f"negative member size {size}")
    limit = MAX_EXTENDED if header[156:157] in (PAX_NEXT, PAX_GLOBAL, GNU_LONGNAME) else MAX_MEMBER
    if size > limit:
        raise TarError(f"member size {size} over the reader's limit of {limit} bytes")
    return size


def _name(header: bytes) -> str:
    name = header[:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
    if header[257:262] == b"ustar" and header[345] != 0:
        name = header[345:500].split(b"\0", 1)[0].decode("utf-8", "surrogateescape") + "/" + name
    return name


def iter_tar(stream):
    """Yield (name, data) for every regular file of the tar `stream`, in archive order.

    A cut inside a member's data raises TruncatedMember naming it, so a reader grouping members
    into samples knows whether the sample before it was complete; a malformed header raises
    TarError. Every header read moves at least one block on, so the read always ends."""
    long_name = pax = None
    while True:
        header = stream.read(BLOCK)
        # The end: zero blocks, EOF, or (as tarfile) a short header at a member boundary; the
        # reader knows from dataset.json how many samples should have come and reports the cut.
        if len(header) != BLOCK or header == bytes(BLOCK):
            return
        if not _checksum_ok(header):
            raise TarError("bad tar header checksum (not a tar file, or corrupt)")
        kind = header[156:157]
        size = _size(header, pax if kind not in (PAX_NEXT, PAX_GLOBAL) else None)
        name = _name(header)
        padded = -(-size // BLOCK) * BLOCK
        if kind in (PAX_NEXT, PAX_GLOBAL, GNU_LONGNAME):
            try:
                data = _read_exact(stream, padded, name)[:size]
            except TruncatedMember:  # the member it describes is unknown: no sample is flushed
                raise EOFError("unexpected end of data in an extended tar header") from None
            if kind == PAX_NEXT:
                pax = _pax_records(data)
            elif kind == GNU_LONGNAME:
                long_name = data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            continue  # global pax records carry nothing a shard reader needs
        if long_name is not None:
            name = long_name
        if pax and "path" in pax:
            name = pax["path"]
        long_name = pax = None
        if kind in REGULAR:
            data = _read_exact(stream, padded, name)
            yield name, data[:size] if padded != size else data
        elif padded:
            _read_exact(stream, padded, name)
