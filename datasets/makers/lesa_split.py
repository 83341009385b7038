"""`lesa convert lesa-split`: LESA's Open Images label split as two plain MID lists.

The official LESA repository (hbdat/cvpr20_LESA, `data/OpenImages/2018_04/`) gives the split as
- `classes-trainable.txt`: the 7,186 seen MIDs, one per line;
- `unseen_labels.pkl`: a pickled numpy object array of the 2,594 test-only MIDs;
- `top_400_unseen.csv`: the 400 evaluated unseen labels as integer indices into that array, one
  per row in the first column, no header, a UTF-8 BOM first (read with `pd.read_csv(header=None)`
  and `values[:, 0]` by LESA and BiAM).
This writes `seen.txt` (7,186 MIDs) and `unseen.txt` (400 MIDs), one per line, in LESA's order,
which `lesa convert openimages --seen/--unseen` reads.

A pickle can run any code when loaded, so `unseen_labels.pkl` goes through `RestrictedUnpickler`,
which resolves only the few numpy globals an object array of strings needs and refuses the rest.
"""

from __future__ import annotations

import io
import pickle

import fsspec
import numpy as np

from datasets.contract import DatasetError, join
from datasets.makers.convert import say

# (module, name) pairs a pickled numpy object array of str may reference, mapped to what they are.
# numpy 2 renamed numpy.core to numpy._core; a pickle written by either names one of them.
try:
    from numpy._core.multiarray import _reconstruct
except ImportError:  # numpy < 2
    from numpy.core.multiarray import _reconstruct
import _codecs

ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _codecs.encode,  # protocol 2 stores the array's bytes through it
}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles plain data and numpy arrays; any other global is refused before it is imported."""

    def __init__(self, file, source: str):
        super().__init__(file, encoding="latin1")  # latin1: Python 2 pickles of numpy arrays load too
        self.source = source

    def find_class(self, module: str, name: str):
        try:
            return ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise DatasetError(
                f"{self.source}: refused to unpickle global {module}.{name}; only a numpy "
                f"array of label MIDs is expected in this file"
            ) from None


def load_restricted_pickle(url: str):
    try:
        with fsspec.open(url, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise DatasetError(f"{url}: not found") from None
    try:
        return RestrictedUnpickler(io.BytesIO(data), url).load()
    except DatasetError:
        raise
    except Exception as exc:
        raise DatasetError(f"{url}: not a readable pickle ({type(exc).__name__}: {exc})") from None


def read_unseen_2594(url: str) -> list[str]:
    array = load_restricted_pickle(url)
    if not isinstance(array, np.ndarray) or array.ndim != 1:
        raise DatasetError(f"{url}: expected a 1-d numpy array of MIDs, got {type(array).__name__}")
    mids = [m.decode() if isinstance(m, bytes) else m for m in array.tolist()]
    odd = next((m for m in mids if not isinstance(m, str)), None)
    if odd is not None:
        raise DatasetError(f"{url}: expected MID strings, found {type(odd).__name__} {odd!r}")
    return mids


def read_top_indices(url: str) -> list[int]:
    try:
        with fsspec.open(url, "rt", encoding="utf-8-sig") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        raise DatasetError(f"{url}: not found") from None
    indices = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        first = line.split(",")[0].strip().strip('"')
        try:
            indices.append(int(float(first)) if first.endswith(".0") else int(first))
        except ValueError:
            raise DatasetError(
                f"{url}:{lineno}: expected an integer index in the first column, got {first!r}"
            ) from None
    return indices


def read_lines(url: str) -> list[str]:
    try:
        with fsspec.open(url, "rt", encoding="utf-8-sig") as f:
            return [line.strip() for line in f.read().splitlines() if line.strip()]
    except FileNotFoundError:
        raise DatasetError(f"{url}: not found") from None


def convert_lesa_split(src: str, out: str, log=say) -> tuple[list[str], list[str]]:
    """Read LESA's split files from folder `src`; write `seen.txt` and `unseen.txt` to `out`."""
    seen = read_lines(join(src, "classes-trainable.txt"))
    pool_url = join(src, "unseen_labels.pkl")
    pool = read_unseen_2594(pool_url)
    top_url = join(src, "top_400_unseen.csv")
    top = read_top_indices(top_url)
    bad = [i for i in top if not 0 <= i < len(pool)]
    if bad:
        raise DatasetError(f"{top_url}: indices {bad[:5]} out of range for the {len(pool)} MIDs of {pool_url}")
    if len(set(top)) != len(top):
        raise DatasetError(f"{top_url}: an index is listed twice")
    unseen = [pool[i] for i in top]
    overlap = sorted(set(seen) & set(unseen))
    if overlap:
        raise DatasetError(
            f"{pool_url}: {len(overlap)} unseen MIDs are also in classes-trainable.txt, e.g. {', '.join(overlap[:5])}"
        )
    fs, path = fsspec.core.url_to_fs(out)
    fs.makedirs(path, exist_ok=True)
    for name, mids in (("seen.txt", seen), ("unseen.txt", unseen)):
        with fsspec.open(join(out, name), "w") as f:
            f.write("".join(m + "\n" for m in mids))
    log(
        f"wrote {join(out, 'seen.txt')} ({len(seen)} MIDs) and {join(out, 'unseen.txt')} "
        f"({len(unseen)} of the {len(pool)} unseen MIDs)"
    )
    return seen, unseen
