"""The tar reader ends on every malformed shard: a clean TarError / EOFError or a normal end, within
a time bound per case, never asking the file for more than a chunk at once (an adversarial audit
found a pax record of length 0 spinning the reader forever, docs/reliability.md, Data path).

Every case runs under a SIGALRM timer that raises inside the parse, so a regression to a loop
fails the case instead of hanging the suite; the stream records every read's size, so a read of
"everything" (-1) or of an 8 GB size field is seen without allocating it."""

from __future__ import annotations

import io
import random
import signal
import tarfile
import tracemalloc
from contextlib import contextmanager

import pytest

from datasets.tar import CHUNK, MAX_MEMBER, TarError, iter_tar

SECONDS_PER_CASE = 2.0


class Hang(Exception):
    pass


@contextmanager
def time_bound(seconds: float = SECONDS_PER_CASE):
    def expire(signum, frame):
        raise Hang(f"the parse ran past {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class WatchedStream(io.BytesIO):
    """A shard in memory that records the size of every read asked of it."""

    def __init__(self, data: bytes):
        super().__init__(data)
        self.asked: list[int] = []

    def read(self, size=-1):
        self.asked.append(size)
        return super().read(size)


def parse(data: bytes) -> tuple[str, list[int]]:
    """'ok', 'TarError' or 'EOFError' for one archive, under the time bound; and the reads asked."""
    stream = WatchedStream(data)
    with time_bound():
        try:
            for _ in iter_tar(stream):
                pass
            outcome = "ok"
        except TarError:
            outcome = "TarError"
        except EOFError:  # TruncatedMember is one
            outcome = "EOFError"
    return outcome, stream.asked


def assert_clean(data: bytes, expect: str | None = None) -> str:
    outcome, asked = parse(data)  # any other exception, or Hang, fails the test here
    assert all(0 <= n <= CHUNK for n in asked), f"a read of {max(asked, key=abs)} bytes was asked for"
    if expect is not None:
        assert outcome == expect
    return outcome


def block(name: bytes = b"a.jpg", size: int = 0, kind: bytes = b"0", size_field: bytes | None = None) -> bytes:
    """One ustar header with a valid checksum, so a test reaches the parse behind the checksum."""
    h = bytearray(512)
    h[: len(name)] = name
    h[100:108] = b"0000644\0"
    h[124:136] = size_field if size_field is not None else b"%011o\0" % size
    h[136:148] = b"00000000000\0"
    h[156:157] = kind
    h[257:265] = b"ustar\x0000"
    return bytes(with_checksum(h))


def with_checksum(h: bytearray) -> bytearray:
    h[148:156] = b" " * 8
    h[148:156] = b"%06o\0 " % sum(h)
    return h


def padded(data: bytes) -> bytes:
    return data + bytes(-len(data) % 512)


def pax_archive(records: bytes, member: bytes = b"abc") -> bytes:
    """A pax header holding `records`, then a member `a.jpg`, then the end blocks."""
    return (
        block(b"././@PaxHeader", len(records), b"x")
        + padded(records)
        + block(b"a.jpg", len(member))
        + padded(member)
        + bytes(1024)
    )


def good_archive(seed: int) -> bytes:
    """Pax shards like the writer's: float mtimes and long names put pax headers in front."""
    rng = random.Random(seed)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for i in range(rng.randint(1, 4)):
            for ext, data in (("jpg", rng.randbytes(rng.randint(0, 1500))), ("labels.json", b'{"pos": [1]}')):
                info = tarfile.TarInfo(f"{'k' * rng.choice([5, 120])}{i}.{ext}")
                info.size, info.mtime = len(data), 1_700_000_000.25
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def header_offsets(data: bytes) -> list[int]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        offsets = []
        for m in tar.getmembers():
            offsets.append(m.offset)
            if m.offset_data - m.offset > 512:  # an extended header came first: its block too
                offsets.append(m.offset_data - 512)
        return sorted(set(offsets))


# --- crafted pax records: the audit's hang and its relatives -------------------------------------

BAD_PAX = {
    "length 0": b"0 path=x\n",
    "negative length": b"-5 path=x\n",
    "negative length, a block back": b"-600 path=x\n",
    "length beyond the member": b"300 path=x\n",
    "huge length": b"99999999999 path=x\n",
    "digits past any int": b"9" * 5000 + b" path=x\n",
    "non-numeric length": b"abc path=x\n",
    "signed length": b"+11 path=x\n",
    "length with underscores": b"1_1 path=x\n",
    "no space": b"11path=xyz\n",
    "no '='": b"7 pathx\n",
    "no newline at the end": b"11 path=xyz",
    "length 1": b"1 path=x\n",
    "negative size": b"12 size=-600\n",
    "non-numeric size": b"12 size=abc\n",
    "size of 8 GB": b"19 size=8589934592\n",
}


@pytest.mark.parametrize("case", BAD_PAX)
def test_a_crafted_pax_record_is_a_tar_error(case):
    assert_clean(pax_archive(BAD_PAX[case]), expect="TarError")


def test_a_valid_pax_record_still_names_the_member():
    records = b"20 path=renamed.jpg\n" + b"10 size=3\n"
    assert list(iter_tar(io.BytesIO(pax_archive(records)))) == [("renamed.jpg", b"abc")]


# --- size fields ---------------------------------------------------------------------------------

HUGE_SIZE_FIELDS = {
    "octal 8 GB": b"%011o\0" % (8 << 30),
    "base-256 8 GB": b"\x80" + (8 << 30).to_bytes(11, "big"),
    "base-256 negative": b"\xff" * 12,
    "base-256 2^88": b"\x80" + b"\xff" * 11,
    "non-octal": b"99999999999\0",
}


@pytest.mark.parametrize("case", HUGE_SIZE_FIELDS)
def test_a_huge_or_negative_size_field_is_refused_without_allocating_it(case):
    data = block(size_field=HUGE_SIZE_FIELDS[case]) + bytes(4096)
    tracemalloc.start()
    try:
        outcome = assert_clean(data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert outcome == "TarError"
    assert peak < 4 * CHUNK


def test_a_size_within_the_limit_but_past_the_file_is_truncation_read_in_chunks():
    size = 64 * CHUNK  # 64 MiB promised, 4 KiB there: the reader holds what arrived, no more
    data = block(size=size) + bytes(4096)
    tracemalloc.start()
    try:
        outcome = assert_clean(data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert outcome == "EOFError" and peak < 4 * CHUNK
    assert size < MAX_MEMBER


# --- fuzzing: random bytes, header mutations, truncations ----------------------------------------


def mutate_header(data: bytes, rng: random.Random) -> bytes:
    """Overwrite a random field of a random header with random bytes; the checksum is fixed so
    the mutation reaches the parser."""
    out = bytearray(data)
    at = rng.choice(header_offsets(data))
    start, end = rng.choice([(0, 100), (124, 136), (156, 157), (257, 265), (345, 500), (0, 512)])
    field = bytearray(rng.randbytes(end - start))
    if rng.random() < 0.5 and end - start >= 2:  # digits and NULs: values octal parsing accepts
        field = bytearray(rng.choice(b"01234567 \0-+9") for _ in range(end - start))
    out[at + start : at + end] = field
    out[at : at + 512] = with_checksum(bytearray(out[at : at + 512]))
    return bytes(out)


def mutate_pax(data: bytes, rng: random.Random) -> bytes:
    """Random bytes in the data of a pax header (its records), which no checksum covers."""
    out = bytearray(data)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        first = tar.getmembers()[0]
    start = first.offset + 512  # the pax header's data: the first member has one (float mtime)
    for _ in range(rng.randint(1, 6)):
        out[start + rng.randrange(40)] = rng.choice(b"0123456789 -=\n\0abc")
    return bytes(out)


def fuzz_cases(count: int):
    rng = random.Random(20240611)
    for i in range(count):
        base = good_archive(i)
        choice = i % 5
        if choice == 0:
            yield rng.randbytes(rng.choice([0, 1, 511, 512, 1024, 3000]))
        elif choice == 1:
            yield mutate_header(base, rng)
        elif choice == 2:
            yield mutate_pax(base, rng)
        elif choice == 3:
            yield base[: rng.randrange(len(base))]
        else:
            yield mutate_header(mutate_pax(base, rng), rng)[: rng.randrange(512, len(base) + 1)]


def test_fuzzed_shards_end_in_a_clean_error_or_a_normal_end():
    outcomes: dict[str, int] = {}
    for data in fuzz_cases(1500):
        outcome = assert_clean(data)
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    # the fuzzing reaches every ending, not only the checksum check
    assert set(outcomes) == {"ok", "TarError", "EOFError"}, outcomes
