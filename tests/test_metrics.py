"""LESA's evaluation protocol (docs/protocol.md) as trainer/evaluation/metrics.py implements it.

- AP per label equals sklearn's average_precision_score over the images annotated for that label
  (y != 0), ties grouped by threshold; a label without a positive gets AP 0 and stays in the mean.
- Top-K precision/recall/F1 are counted globally (micro) over all images, checked against numbers
  worked out by hand.
- The distributed path (real gloo process groups, uneven row splits, one rank with no rows) gives
  exactly the single-process numbers.
- `lesa metrics` prints compute_metrics as JSON and rejects bad inputs naming the file.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from launch.cli import main as cli_main
from trainer.evaluation.metrics import average_precision, compute_metrics, evaluate_settings, per_label_ap

REPO = Path(__file__).resolve().parents[1]


# --- helpers -------------------------------------------------------------------------------------


def sklearn_ap(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """The reference: per label, sklearn AP over annotated images; 0 if no positive there."""
    out = []
    for j in range(scores.shape[1]):
        annotated = labels[:, j] != 0
        truth = labels[annotated, j] > 0
        if truth.sum() == 0:
            out.append(0.0)
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out.append(float(average_precision_score(truth.astype(int), scores[annotated, j])))
    return np.array(out)


def random_problem(rng: np.random.Generator, n: int, c: int, levels: int = 4):
    """Integer-valued scores (many ties) and labels in {+1, -1, 0} with the awkward cases forced in:
    a label with no positive, a label with no annotation at all, a label positive wherever annotated,
    an image with no positive, an image with no annotation at all."""
    scores = rng.integers(0, levels, size=(n, c)).astype(np.float64)
    labels = rng.choice(np.array([1, -1, 0], dtype=np.int8), size=(n, c), p=[0.3, 0.45, 0.25])
    if c >= 3 and n >= 3:
        labels[:, 0] = np.where(labels[:, 0] > 0, -1, labels[:, 0])  # annotated, no positive
        labels[:, 1] = 0  # not annotated anywhere
        labels[:, 2] = 1  # positive on rows >= 2
        labels[0, :] = np.where(labels[0, :] > 0, -1, labels[0, :])  # image without positives
        labels[1, :] = 0  # image without annotation
    return scores, labels


# --- a. AP against sklearn -----------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(40))
def test_per_label_ap_matches_sklearn_with_ties_and_unknowns(seed):
    rng = np.random.default_rng(seed)
    n, c = int(rng.integers(3, 40)), int(rng.integers(3, 12))
    scores, labels = random_problem(rng, n, c, levels=int(rng.integers(2, 6)))
    expected = sklearn_ap(scores, labels)
    got = per_label_ap(scores, labels)
    assert got.shape == (c,)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)
    assert got[0] == 0.0 and got[1] == 0.0  # no positive / no annotation -> AP 0
    # the mean keeps the zero APs (all C labels), in percent
    assert compute_metrics(scores, labels, [1])["mAP"] == pytest.approx(100 * expected.mean(), abs=1e-10)


@pytest.mark.parametrize("seed", range(10))
def test_average_precision_matches_sklearn_on_continuous_and_tied_scores(seed):
    rng = np.random.default_rng(1000 + seed)
    n = 200
    y = rng.choice([1, -1, 0], size=n, p=[0.2, 0.6, 0.2])
    y[0] = 1
    for scores in (rng.normal(size=n), np.round(rng.normal(size=n), 1), rng.integers(0, 2, n) * 1.0):
        annotated = y != 0
        expected = average_precision_score(y[annotated] > 0, scores[annotated])
        assert average_precision(scores, y) == pytest.approx(expected, abs=1e-12)


def test_average_precision_by_hand_ties_are_one_step():
    # threshold 1: {pos, neg} -> P 1/2, R 1/2; threshold 0: all three -> P 2/3, R 1
    # AP = 1/2 * 1/2 + 1/2 * 2/3 = 7/12 regardless of the order of the tied rows
    assert average_precision(np.array([1.0, 1.0, 0.0]), np.array([1, -1, 1])) == pytest.approx(7 / 12)
    assert average_precision(np.array([1.0, 1.0, 0.0]), np.array([-1, 1, 1])) == pytest.approx(7 / 12)
    # the unknown image is ignored even though it holds the top score
    assert average_precision(np.array([5.0, 1.0, 1.0, 0.0]), np.array([0, 1, -1, 1])) == pytest.approx(7 / 12)


def test_average_precision_edge_cases():
    assert average_precision(np.array([0.3, 0.2]), np.array([-1, -1])) == 0.0  # no positive
    assert average_precision(np.array([0.3, 0.2]), np.array([0, 0])) == 0.0  # nothing annotated
    assert average_precision(np.array([]), np.array([], dtype=np.int8)) == 0.0  # no images
    assert average_precision(np.array([0.1, 0.9]), np.array([1, 1])) == 1.0  # only positives
    assert average_precision(np.array([0.1, 0.9]), np.array([1, -1])) == 0.5  # positive ranked 2nd
    assert average_precision(np.array([2.0, 2.0]), np.array([1, -1])) == 0.5  # a full tie


def test_per_label_ap_of_images_without_positives_or_annotations():
    scores = np.array([[0.9, 0.1], [0.5, 0.5], [0.2, 0.8]])
    labels = np.array([[0, 0], [-1, -1], [1, 1]], dtype=np.int8)  # image 0 unknown, image 1 all negative
    np.testing.assert_allclose(per_label_ap(scores, labels), [0.5, 1.0])
    np.testing.assert_allclose(per_label_ap(scores, labels), sklearn_ap(scores, labels))


# --- b. top-K precision / recall / F1 by hand ----------------------------------------------------

# 3 images x 4 labels.
HAND_SCORES = np.array(
    [
        [0.9, 0.8, 0.1, 0.5],  # top-2: label 0 (+1, TP), label 1 (unknown -> FP)
        [0.2, 0.2, 0.2, 0.7],  # top-2: label 3 (+1, TP), then the 3-way tie goes to label 0 (-1, FP)
        [0.3, 0.6, 0.6, 0.0],  # no positive at all: top-2 labels 1, 2 are 2 FPs
    ]
)
HAND_LABELS = np.array(
    [
        [1, 0, 1, -1],  # 2 positives
        [-1, 1, -1, 1],  # 2 positives
        [-1, -1, -1, 0],  # 0 positives (and one unknown, never in the recall denominator)
    ],
    dtype=np.int8,
)
# positives: 4.
# K=1: picks 0 | 3 | 1 (tie 1/2 -> 1)        TP = 1 + 1 + 0 = 2  P = 2/3  R = 2/4
# K=2: picks 0,1 | 3,0 | 1,2                 TP = 1 + 1 + 0 = 2  P = 2/6  R = 2/4
# K=3: picks 0,1,3 | 3,0,1 | 1,2,0           TP = 1 + 2 + 0 = 3  P = 3/9  R = 3/4
HAND_EXPECTED = {
    1: (2 / 3, 1 / 2, 4 / 7),
    2: (1 / 3, 1 / 2, 2 / 5),
    3: (1 / 3, 3 / 4, 6 / 13),
}
# AP by hand: label 0: annotated rows all, + ranked 1st -> 1. label 1: rows 1, 2 (0.2 +, 0.6 -) -> 1/2.
# label 2: rows all, scores 0.1 (+), 0.2, 0.6 -> + ranked 3rd -> 1/3. label 3: rows 0, 1 (0.5 -, 0.7 +) -> 1.
HAND_MAP = (1 + 1 / 2 + 1 / 3 + 1) / 4


@pytest.mark.parametrize("k", [1, 2, 3])
def test_topk_precision_recall_f1_by_hand(k):
    out = compute_metrics(HAND_SCORES, HAND_LABELS, [k])
    p, r, f1 = HAND_EXPECTED[k]
    assert out[f"P@{k}"] == pytest.approx(100 * p, abs=1e-12)
    assert out[f"R@{k}"] == pytest.approx(100 * r, abs=1e-12)
    assert out[f"F1@{k}"] == pytest.approx(100 * f1, abs=1e-12)


def test_map_by_hand():
    assert compute_metrics(HAND_SCORES, HAND_LABELS, [2])["mAP"] == pytest.approx(100 * HAND_MAP, abs=1e-12)
    np.testing.assert_allclose(per_label_ap(HAND_SCORES, HAND_LABELS), [1, 1 / 2, 1 / 3, 1])


def test_topk_counts_images_without_positives_as_false_positives():
    # dropping the image without positives raises precision (LESA keeps it: K FPs)
    kept = compute_metrics(HAND_SCORES[:2], HAND_LABELS[:2], [2])
    assert kept["P@2"] == pytest.approx(100 * 2 / 4)
    assert kept["R@2"] == pytest.approx(100 * 2 / 4)


def test_topk_unknown_positive_not_in_recall_and_predicted_unknown_is_fp():
    scores = np.array([[3.0, 2.0, 1.0]])
    # label 0 unknown but top-scored: it takes a slot and is no TP; label 1 is the only positive
    labels = np.array([[0, 1, -1]], dtype=np.int8)
    out = compute_metrics(scores, labels, [1, 2])
    assert out["P@1"] == 0.0 and out["R@1"] == 0.0 and out["F1@1"] == 0.0
    assert out["P@2"] == pytest.approx(50.0) and out["R@2"] == pytest.approx(100.0)
    assert out["F1@2"] == pytest.approx(100 * 2 * 0.5 * 1.0 / 1.5)


def test_topk_micro_not_per_image_average():
    # image 0: 1 positive found of 1; image 1: 0 of 3. micro R = 1/4, per-image mean would be 1/2
    scores = np.array([[1.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    labels = np.array([[1, -1, -1, -1], [-1, 1, 1, 1]], dtype=np.int8)
    out = compute_metrics(scores, labels, [1])
    assert out["R@1"] == pytest.approx(25.0)
    assert out["P@1"] == pytest.approx(50.0)


@pytest.mark.parametrize("seed", range(5))
def test_topk_matches_a_brute_force_count(seed):
    rng = np.random.default_rng(seed)
    scores, labels = random_problem(rng, 30, 9, levels=3)
    for k in (1, 3, 5):
        tp = 0
        for s, y in zip(scores, labels):
            # stable: among equal scores the lower label index comes first
            ranked = sorted(range(len(s)), key=lambda j: (-s[j], j))[:k]
            tp += sum(int(y[j] > 0) for j in ranked)
        p, r = tp / (len(scores) * k), tp / int((labels > 0).sum())
        out = compute_metrics(scores, labels, [k])
        assert out[f"P@{k}"] == pytest.approx(100 * p, abs=1e-12)
        assert out[f"R@{k}"] == pytest.approx(100 * r, abs=1e-12)
        assert out[f"F1@{k}"] == pytest.approx(100 * (2 * p * r / (p + r) if p + r else 0.0), abs=1e-12)


def _stable_argsort_tp(scores, labels, k):
    """Reference: a stable sort by descending score (ties to the lower label index)."""
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return int((np.take_along_axis(labels, top, axis=1) > 0).sum())


@pytest.mark.filterwarnings("ignore:invalid value encountered in subtract")  # AP's diff of inf - inf
@pytest.mark.parametrize("levels", [2, 3, 1000])
def test_topk_over_many_rows_matches_stable_sort(levels):
    """More rows than one chunk (ROW_CHUNK), heavy ties, +-inf and signed zeros, K up to and past C."""
    from trainer.evaluation.metrics import ROW_CHUNK, topk_true_positives

    rng = np.random.default_rng(levels)
    n, c = ROW_CHUNK + 517, 13
    scores = rng.integers(0, levels, size=(n, c)).astype(np.float64)
    scores[rng.random((n, c)) < 0.02] = np.inf
    scores[rng.random((n, c)) < 0.02] = -np.inf
    scores[rng.random((n, c)) < 0.05] = -0.0
    labels = rng.choice(np.array([1, -1, 0], dtype=np.int8), size=(n, c), p=[0.3, 0.5, 0.2])
    num_pos = int((labels > 0).sum())
    for k in (1, 2, 5, c - 1, c):
        tp = _stable_argsort_tp(scores, labels, k)
        assert topk_true_positives(scores, labels, k) == tp, k
        out = compute_metrics(scores, labels, [k])
        assert out[f"P@{k}"] == pytest.approx(100 * tp / (n * k), abs=1e-12)
        assert out[f"R@{k}"] == pytest.approx(100 * tp / num_pos, abs=1e-12)
    # K = C predicts every label: recall 100 %; K beyond C predicts the same set
    assert compute_metrics(scores, labels, [c])[f"R@{c}"] == pytest.approx(100.0)
    assert topk_true_positives(scores, labels, c + 4) == num_pos


# --- c. compute_metrics output shape -------------------------------------------------------------


def test_compute_metrics_keys_and_percent():
    out = compute_metrics(HAND_SCORES, HAND_LABELS, [3, 2])
    assert set(out) == {"P@3", "R@3", "F1@3", "P@2", "R@2", "F1@2", "mAP"}
    assert all(isinstance(v, float) for v in out.values())
    assert all(0.0 <= v <= 100.0 for v in out.values())
    assert out["R@3"] == pytest.approx(75.0)  # percent, not a fraction
    perfect = compute_metrics(np.eye(3), np.where(np.eye(3) > 0, 1, -1), [1])
    assert perfect == {"P@1": 100.0, "R@1": 100.0, "F1@1": 100.0, "mAP": 100.0}
    json.dumps(out)  # plain floats, JSON-able


def test_compute_metrics_equals_evaluate_settings_without_process_group():
    rng = np.random.default_rng(7)
    scores, labels = random_problem(rng, 25, 8)
    cols = np.array([1, 3, 4, 7])
    res = evaluate_settings(scores, labels, {"zsl": cols, "gzsl": np.arange(8)}, [2, 3])
    assert res["gzsl"] == pytest.approx(compute_metrics(scores, labels, [2, 3]), abs=1e-12)
    assert res["zsl"] == pytest.approx(compute_metrics(scores[:, cols], labels[:, cols], [2, 3]), abs=1e-12)


# --- d. distributed exactness (real gloo process groups) ------------------------------------------


def _dist_worker(rank: int, world: int, workdir: str, num_problems: int) -> None:
    import torch.distributed as dist

    from trainer.evaluation.metrics import evaluate_settings as evaluate

    dist.init_process_group("gloo", init_method=f"file://{os.path.join(workdir, 'store')}", rank=rank, world_size=world)
    try:
        for i in range(num_problems):
            data = np.load(os.path.join(workdir, f"problem-{i}.npz"))
            lo, hi = int(data["bounds"][rank]), int(data["bounds"][rank + 1])
            scores, labels = data["scores"][lo:hi], data["labels"][lo:hi]
            settings = {"zsl": data["zsl"], "gzsl": data["gzsl"]}
            result = evaluate(scores, labels, settings, [int(k) for k in data["ks"]])
            with open(os.path.join(workdir, f"result-{i}-{rank}.json"), "w") as f:
                json.dump({"rows": hi - lo, "result": result}, f)
    finally:
        dist.destroy_process_group()


# per world size: problems as (rows per rank: uneven, one rank empty; number of labels; zsl columns)
DIST_CASES = {
    2: [
        ([0, 37], 11, [2, 5, 6, 9]),  # rank 0 holds no rows
        ([30, 1], 5, [0, 3]),
    ],  # a rank with a single row
    3: [
        ([9, 0, 28], 11, [0, 1, 4, 10]),  # rank 1 holds no rows
        ([20, 17, 0], 2, [1]),
    ],  # rank 2: no rows and, with 2 labels, no labels to own
}


def _dist_problem(seed: int, n: int, num_labels: int):
    rng = np.random.default_rng(seed)
    scores, labels = random_problem(rng, n, num_labels, levels=3)
    if num_labels < 3:  # still force a label without positives and an image without positives
        labels[:, 0] = np.where(labels[:, 0] > 0, -1, labels[:, 0])
        labels[0, :] = -1
        labels[1:4, 1] = 1
    return scores, labels


@pytest.mark.parametrize("world", sorted(DIST_CASES))
def test_distributed_evaluate_settings_is_exact(tmp_path, world):
    import torch.multiprocessing as mp

    ks = [1, 3]
    problems = []
    for i, (rows, num_labels, zsl) in enumerate(DIST_CASES[world]):
        scores, labels = _dist_problem(world * 100 + i, sum(rows), num_labels)
        zsl, gzsl = np.array(zsl), np.arange(num_labels)
        np.savez(
            tmp_path / f"problem-{i}.npz",
            scores=scores,
            labels=labels,
            bounds=np.cumsum([0, *rows]),
            zsl=zsl,
            gzsl=gzsl,
            ks=np.array(ks),
        )
        problems.append((rows, evaluate_settings(scores, labels, {"zsl": zsl, "gzsl": gzsl}, ks)))

    mp.spawn(_dist_worker, args=(world, str(tmp_path), len(problems)), nprocs=world, join=True)

    for i, (rows, expected) in enumerate(problems):
        assert expected["gzsl"]["mAP"] > 0
        for rank in range(world):
            got = json.loads((tmp_path / f"result-{i}-{rank}.json").read_text())
            assert got["rows"] == rows[rank]
            assert set(got["result"]) == {"zsl", "gzsl"}
            for setting in ("zsl", "gzsl"):
                assert set(got["result"][setting]) == set(expected[setting])
                for key, value in expected[setting].items():
                    assert abs(got["result"][setting][key] - value) <= 1e-9, (i, rank, setting, key)


def test_distributed_reference_has_the_awkward_cases():
    """The problems above really contain ties, unknowns, labels and images without positives."""
    for world, cases in DIST_CASES.items():
        for i, (rows, num_labels, _) in enumerate(cases):
            scores, labels = _dist_problem(world * 100 + i, sum(rows), num_labels)
            assert len(np.unique(scores)) < scores.size  # ties
            assert (labels == 0).any()  # unknowns
            assert not (labels > 0).any(axis=0).all()  # a label without positives
            assert not (labels > 0).any(axis=1).all()  # an image without positives


# --- e. the CLI ------------------------------------------------------------------------------------


def _write(tmp_path, scores, labels):
    s, y = tmp_path / "S.npy", tmp_path / "Y.npy"
    np.save(s, scores)
    np.save(y, labels)
    return s, y


def test_cli_metrics_prints_compute_metrics(tmp_path, capsys):
    rng = np.random.default_rng(3)
    scores, labels = random_problem(rng, 20, 7)
    s, y = _write(tmp_path, scores.astype(np.float32), labels)
    assert cli_main(["metrics", "--scores", str(s), "--labels", str(y), "--k", "3", "5"]) == 0
    printed = json.loads(capsys.readouterr().out)
    expected = compute_metrics(scores.astype(np.float32), labels, [3, 5])
    assert set(printed) == {"P@3", "R@3", "F1@3", "P@5", "R@5", "F1@5", "mAP"}
    assert printed == pytest.approx(expected, abs=1e-12)


def test_cli_metrics_hand_example(tmp_path, capsys):
    s, y = _write(tmp_path, HAND_SCORES, HAND_LABELS.astype(np.int64))
    cli_main(["metrics", "--scores", str(s), "--labels", str(y), "--k", "2"])
    printed = json.loads(capsys.readouterr().out)
    assert printed["P@2"] == pytest.approx(100 / 3)
    assert printed["R@2"] == pytest.approx(50.0)
    assert printed["F1@2"] == pytest.approx(40.0)
    assert printed["mAP"] == pytest.approx(100 * HAND_MAP)


def test_cli_metrics_console_script(tmp_path):
    s, y = _write(tmp_path, HAND_SCORES, HAND_LABELS)
    lesa = Path(sys.executable).with_name("lesa")
    cmd = [str(lesa)] if lesa.exists() else [sys.executable, "-m", "launch.cli"]
    proc = subprocess.run(
        [*cmd, "metrics", "--scores", str(s), "--labels", str(y), "--k", "3", "5"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == pytest.approx(compute_metrics(HAND_SCORES, HAND_LABELS, [3, 5]))


def test_cli_metrics_shape_mismatch_names_files(tmp_path):
    s, y = _write(tmp_path, np.zeros((4, 3)), np.ones((4, 5), dtype=np.int8))
    with pytest.raises(SystemExit) as exc:
        cli_main(["metrics", "--scores", str(s), "--labels", str(y)])
    message = str(exc.value.code)
    assert str(s) in message and str(y) in message


def test_cli_metrics_one_dimensional_scores_rejected(tmp_path):
    s, y = _write(tmp_path, np.zeros(4), np.ones(4, dtype=np.int8))
    with pytest.raises(SystemExit) as exc:
        cli_main(["metrics", "--scores", str(s), "--labels", str(y)])
    assert str(s) in str(exc.value.code)


@pytest.mark.parametrize("bad", [2, -2, 0.5])
def test_cli_metrics_bad_label_values_name_the_labels_file(tmp_path, bad):
    labels = HAND_LABELS.astype(np.float64)
    labels[1, 2] = bad
    s, y = _write(tmp_path, HAND_SCORES, labels)
    with pytest.raises(SystemExit) as exc:
        cli_main(["metrics", "--scores", str(s), "--labels", str(y)])
    message = str(exc.value.code)
    assert str(y) in message and str(bad) in message


def test_cli_metrics_error_exit_status_and_stderr(tmp_path):
    s, y = _write(tmp_path, HAND_SCORES, np.full(HAND_SCORES.shape, 7, dtype=np.int8))
    proc = subprocess.run(
        [sys.executable, "-m", "launch.cli", "metrics", "--scores", str(s), "--labels", str(y)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert proc.returncode != 0
    assert str(y) in proc.stderr
    assert proc.stdout == ""


@pytest.mark.parametrize(
    "shape,ks",
    [
        ((300, 7586), [10, 20]),
        ((200, 40), [3, 5]),
        ((130, 7), [3, 7]),
        ((70, 400), [1, 400]),
        ((40, 64), [3, 5]),
        ((33, 65), [5]),
        ((20, 7587), [10, 20]),
    ],
)
def test_kth_largest_matches_a_full_sort_with_ties(shape, ks):
    from trainer.evaluation.metrics import kth_largest

    rng = np.random.default_rng(sum(shape))
    scores = rng.standard_normal(shape).astype(np.float16).astype(np.float32)  # many ties
    scores[::7, : shape[1] // 2] = 0.5  # whole runs of ties
    scores[3, :] = -np.inf
    expected = -np.sort(-scores, axis=1)[:, np.asarray(ks) - 1]
    np.testing.assert_array_equal(kth_largest(scores, ks), expected)


@pytest.mark.parametrize("sort_below", [0, 2048], ids=["kernel", "sort"])
def test_kth_largest_every_small_width(monkeypatch, sort_below):
    """Every row width 1..90 with K up to the width, through both paths: the kernel's group
    layout changes with each width."""
    import trainer.evaluation.metrics
    from trainer.evaluation.metrics import kth_largest

    monkeypatch.setattr(trainer.evaluation.metrics, "SORT_BELOW", sort_below)

    rng = np.random.default_rng(5)
    for width in range(1, 91):
        scores = rng.integers(0, 6, (9, width)).astype(np.float32)  # ties everywhere
        ks = sorted({1, min(3, width), width, int(rng.integers(1, width + 1))})
        expected = -np.sort(-scores, axis=1)[:, np.asarray(ks) - 1]
        np.testing.assert_array_equal(kth_largest(scores, ks), expected, err_msg=f"width {width}, ks {ks}")


@pytest.mark.parametrize(
    "width,ks", [(2048, [3, 5]), (4095, [10, 20]), (7586, [1, 64]), (8191, [40, 129]), (2048, [32, 33]), (3000, [3000])]
)
def test_kth_kernel_around_its_group_layout(width, ks):
    """Widths that leave a tail past the last fold, K around the group count (2048 / 64 = 32
    groups: K = 33 scans whole rows) and K = the width; rows of one value, of -inf and +inf."""
    from trainer.evaluation.kth_kernel import kth_largest_f32

    rng = np.random.default_rng(width)
    scores = rng.standard_normal((23, width)).astype(np.float16).astype(np.float32)
    scores[1] = 0.25
    scores[2, ::3] = np.inf
    scores[4] = -np.inf
    scores[5, -7:] = 99.0  # the top sits in the tail
    expected = -np.sort(-scores, axis=1)[:, np.asarray(ks) - 1]
    np.testing.assert_array_equal(kth_largest_f32(scores, ks), expected)


def test_kth_kernel_skips_nan_scores():
    from trainer.evaluation.kth_kernel import kth_largest_f32

    scores = np.arange(4096, dtype=np.float32)[None].repeat(2, 0)
    scores[0, 4095] = np.nan
    scores[1] = np.nan
    np.testing.assert_array_equal(kth_largest_f32(scores, [1, 2]), [[4094, 4093], [np.nan, np.nan]])


def test_kth_kernel_is_built_once_into_the_cache(monkeypatch, tmp_path):
    from trainer.evaluation import kth_kernel

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    kth_kernel._library.cache_clear()
    try:
        scores = np.random.default_rng(1).random((8, 3000), dtype=np.float32)
        np.testing.assert_array_equal(kth_kernel.kth_largest_f32(scores, [2]), -np.sort(-scores, axis=1)[:, [1]])
        (built,) = (tmp_path / "lesa").iterdir()
        assert built.name.startswith("kth_largest-") and built.suffix == ".so"
        kth_kernel._library.cache_clear()
        stamp = built.stat().st_mtime_ns
        kth_kernel.kth_largest_f32(scores, [2])
        assert built.stat().st_mtime_ns == stamp  # loaded, not rebuilt
    finally:
        kth_kernel._library.cache_clear()


def test_kth_largest_sorts_when_no_compiler_builds_the_kernel(monkeypatch, tmp_path):
    """A machine without a C compiler: one warning naming the source, and the same K-th scores."""
    from trainer.evaluation import kth_kernel
    from trainer.evaluation.metrics import kth_largest

    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    kth_kernel._library.cache_clear()
    try:
        scores = np.random.default_rng(0).random((50, 5000), dtype=np.float32)
        with pytest.warns(RuntimeWarning, match="kth_largest.c"):
            found = kth_largest(scores, [3, 7])
        np.testing.assert_array_equal(found, -np.sort(-scores, axis=1)[:, [2, 6]])
        assert kth_kernel.kth_largest_f32(scores, [3]) is None
    finally:
        kth_kernel._library.cache_clear()


def test_ascending_key_orders_and_ties_exactly_as_the_floats():
    from trainer.evaluation.metrics import ascending_key

    rng = np.random.default_rng(3)
    special = np.array(
        [-np.inf, np.inf, -0.0, 0.0, 1e-45, -1e-45, np.finfo(np.float32).max, np.finfo(np.float32).min, 1.0, -1.0],
        dtype=np.float32,
    )
    values = np.concatenate([special, rng.standard_normal(500).astype(np.float16).astype(np.float32)])
    key = ascending_key(values)
    assert key.dtype == np.uint64 and key.max() < 2**32
    i, j = np.meshgrid(np.arange(len(values)), np.arange(len(values)))
    np.testing.assert_array_equal(key[i] < key[j], values[i] < values[j])
    np.testing.assert_array_equal(key[i] == key[j], values[i] == values[j])  # -0.0 ties with 0.0
    wide = rng.integers(0, 5, 50).astype(np.float64)  # other dtypes: their rank
    np.testing.assert_array_equal(np.argsort(ascending_key(wide), kind="stable"), np.argsort(wide, kind="stable"))


@pytest.mark.parametrize("seed", range(6))
def test_streaming_metrics_equal_the_reference_for_any_batching(seed):
    """Batches of any size, empty ones included, fed as they would come from the model."""
    import torch

    from trainer.evaluation.metrics import Annotations, StreamingMetrics

    rng = np.random.default_rng(seed)
    n, c = 90, int(rng.integers(3, 30))
    scores, labels = random_problem(rng, n, c, levels=int(rng.integers(2, 5)))
    scores = scores.astype(np.float32)
    zsl = np.sort(rng.choice(c, max(1, c // 3), replace=False))
    ks = [1, 3, c + 2]
    metrics = StreamingMetrics({"zsl": zsl, "gzsl": np.arange(c)}, c, ks)
    cuts = np.unique(np.r_[0, rng.integers(0, n, 6), 40, 40, n])  # 40 twice: an empty batch
    for lo, hi in zip(np.r_[cuts[:-1], 40], np.r_[cuts[1:], 40]):
        metrics.add(torch.from_numpy(scores[lo:hi]), Annotations.from_dense(labels[lo:hi]))
    results, stats = metrics.result()
    assert results["gzsl"] == pytest.approx(compute_metrics(scores, labels, ks), abs=1e-12)
    assert results["zsl"] == pytest.approx(compute_metrics(scores[:, zsl], labels[:, zsl], ks), abs=1e-12)
    np.testing.assert_array_equal(stats.positives, (labels > 0).sum(0))
    np.testing.assert_array_equal(stats.annotated, (labels != 0).sum(0))


def test_streaming_metrics_take_bf16_scores_as_the_model_gives_them():
    import torch

    from trainer.evaluation.metrics import Annotations, StreamingMetrics

    rng = np.random.default_rng(11)
    scores, labels = random_problem(rng, 40, 9)
    half = torch.from_numpy(scores.astype(np.float32) / 7).to(torch.bfloat16)
    metrics = StreamingMetrics({"all": np.arange(9)}, 9, [2])
    metrics.add(half, Annotations.from_dense(labels))
    expected = compute_metrics(half.float().numpy(), labels, [2])
    assert metrics.result()[0]["all"] == pytest.approx(expected, abs=1e-12)


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a GPU")
def test_k_th_scores_on_the_gpu_equal_the_cpu_filter():
    """The GPU path (torch.topk) against the CPU kernel, wide rows with ties; run on the lent GPU."""
    import torch

    from trainer.evaluation.metrics import Annotations, StreamingMetrics, kth_largest_rows

    rng = np.random.default_rng(2)
    scores = rng.standard_normal((700, 7586)).astype(np.float16).astype(np.float32)
    scores[::5, :3000] = 0.25
    for ks in ([10, 20], [1, 7586]):
        np.testing.assert_array_equal(
            kth_largest_rows(torch.from_numpy(scores).cuda(), ks).cpu().numpy(),
            kth_largest_rows(torch.from_numpy(scores), ks).numpy(),
        )
    labels = rng.choice(np.array([1, -1, 0], dtype=np.int8), size=scores.shape, p=[0.01, 0.01, 0.98])
    results = []
    for device in ("cuda", "cpu"):
        metrics = StreamingMetrics({"all": np.arange(7586)}, 7586, [10, 20])
        for lo in range(0, 700, 128):
            metrics.add(
                torch.from_numpy(scores[lo : lo + 128]).to(device), Annotations.from_dense(labels[lo : lo + 128])
            )
        results.append(metrics.result()[0])
    assert results[0] == results[1]
