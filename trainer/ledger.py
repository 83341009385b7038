"""The sample ledger (`data.ledger: true`): `OUT/ledger/*.tsv`, one line `epoch<TAB>key` per
sample whose gradient is in the model. Lines go to a pending file per worker and are committed
under the step of the checkpoint that holds them; a resume from step S discards every committed
file past S and every pending file, so the ledger always describes the restored model."""

from __future__ import annotations

import os
import uuid
from pathlib import Path


class Ledger:
    def __init__(self, root: str | Path, rank: int):
        self.root, self.rank = Path(root), rank
        self.root.mkdir(parents=True, exist_ok=True)
        self._open()

    def _open(self) -> None:
        self.pending = self.root / f"pending-rank{self.rank}-{uuid.uuid4().hex[:8]}.tsv"
        self.file = open(self.pending, "w")  # noqa: SIM115 - held open across steps, closed by commit/close

    def record(self, epochs: list[int], keys: list[str]) -> None:
        self.file.writelines(f"{e}\t{k}\n" for e, k in zip(epochs, keys))

    def commit(self, step: int) -> None:
        self.file.close()
        os.replace(self.pending, self.root / f"step{step:09d}-rank{self.rank}-{self.pending.stem.split('-')[-1]}.tsv")
        self._open()

    def close(self) -> None:
        """At the end of a run: the pending file holds nothing a checkpoint does not cover."""
        self.file.close()
        self.pending.unlink()

    @staticmethod
    def discard_after(root: str | Path, step: int) -> None:
        root = Path(root)
        if not root.is_dir():
            return
        for path in root.glob("*.tsv"):
            if path.name.startswith("pending-") or int(path.name[4:13]) > step:
                path.unlink()


def read_ledger(root: str | Path) -> list[tuple[int, str]]:
    """All committed entries (epoch, key), for audits and tests."""
    entries = []
    for path in sorted(Path(root).glob("step*.tsv")):
        for line in path.read_text().splitlines():
            epoch, key = line.split("\t")
            entries.append((int(epoch), key))
    return entries
