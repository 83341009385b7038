"""`lesa convert lesa-split`: LESA's split files to MID lists; its pickle only through the restricted unpickler."""

import os
import pickle

import numpy as np
import pytest

from datasets.contract import DatasetError
from datasets.makers.lesa_split import convert_lesa_split, load_restricted_pickle
from launch.cli import main

SEEN = ["/m/s0", "/m/s1", "/m/s2"]
POOL = ["/m/u0", "/m/u1", "/m/u2", "/m/u3", "/m/u4"]


def write_split(folder, protocol=pickle.DEFAULT_PROTOCOL, top=(3, 0, 4)):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "classes-trainable.txt").write_text("".join(m + "\n" for m in SEEN))
    with open(folder / "unseen_labels.pkl", "wb") as f:
        pickle.dump(np.array(POOL, dtype=object), f, protocol=protocol)
    # As in the LESA repository: a UTF-8 BOM, then one index per row in the first column, no header.
    (folder / "top_400_unseen.csv").write_bytes(b"\xef\xbb\xbf" + "".join(f"{i}\r\n" for i in top).encode())


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_split_lists_in_lesa_order(tmp_path, protocol):
    write_split(tmp_path / "src", protocol)
    seen, unseen = convert_lesa_split(str(tmp_path / "src"), str(tmp_path / "out"), log=lambda m: None)
    assert seen == SEEN and unseen == ["/m/u3", "/m/u0", "/m/u4"]
    assert (tmp_path / "out" / "seen.txt").read_text().split() == SEEN
    assert (tmp_path / "out" / "unseen.txt").read_text().split() == unseen


class SystemCall:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return os.system, (f"touch {self.target}",)


class EvalCall:
    def __reduce__(self):
        return eval, ("__import__('os').getcwd()",)


@pytest.mark.parametrize("payload", ["system", "eval", "inside_array"])
def test_malicious_pickle_refused_without_running(tmp_path, payload):
    target = tmp_path / "pwned"
    path = tmp_path / "unseen_labels.pkl"
    obj = {
        "system": SystemCall(target),
        "eval": EvalCall(),
        "inside_array": np.array(["/m/u0", SystemCall(target)], dtype=object),
    }[payload]
    path.write_bytes(pickle.dumps(obj))
    with pytest.raises(
        DatasetError, match=r"unseen_labels.pkl: refused to unpickle global (posix|os|builtins)\.(system|eval)"
    ):
        load_restricted_pickle(str(path))
    assert not target.exists()


def test_bad_split_files(tmp_path, capsys):
    src = tmp_path / "src"
    write_split(src, top=(0, 9))
    with pytest.raises(DatasetError, match=r"top_400_unseen.csv: indices \[9\] out of range for the 5 MIDs"):
        convert_lesa_split(str(src), str(tmp_path / "out"))
    with open(src / "unseen_labels.pkl", "wb") as f:
        pickle.dump(np.array([1, 2, 3]), f)  # a numeric array: allowed globals, wrong content
    (src / "top_400_unseen.csv").write_text("0\n")
    with pytest.raises(DatasetError, match="unseen_labels.pkl: expected MID strings"):
        convert_lesa_split(str(src), str(tmp_path / "out"))
    (src / "unseen_labels.pkl").write_bytes(b"not a pickle at all")
    with pytest.raises(DatasetError, match="unseen_labels.pkl: not a readable pickle"):
        convert_lesa_split(str(src), str(tmp_path / "out"))

    # Through the CLI: a refused pickle is exit code 2 and a message naming the file.
    (src / "unseen_labels.pkl").write_bytes(pickle.dumps(SystemCall(tmp_path / "pwned")))
    assert main(["convert", "lesa-split", "--from", str(src), "--out", str(tmp_path / "out")]) == 2
    assert "unseen_labels.pkl: refused to unpickle global" in capsys.readouterr().err
    assert not (tmp_path / "pwned").exists()
    write_split(src)
    assert main(["convert", "lesa-split", "--from", str(src), "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "unseen.txt").read_text().split() == ["/m/u3", "/m/u0", "/m/u4"]
