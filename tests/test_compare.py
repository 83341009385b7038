"""`lesa compare`: the table in the paper's format, failures reported in it, and the MLflow parent
run with one nested run per model; tests/integration/test_compare_e2e.py trains every model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

import launch.compare
import launch.driver
from launch.cli import main
from launch.compare import ABLATIONS, Variant, failure_reason, format_table_md, model_variants, run_compare, run_seeds
from trainer.config import ConfigError

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "launch" / "synthetic.yaml")
ALL_MODELS = ["lesa", "fast0tag", "labelem", "conse", "one_attention_per_label"]


def fake_metrics(mAP: float) -> dict:
    setting = {f"{m}@{k}": mAP / 2 for m in ("P", "R", "F1") for k in (3, 5)} | {"mAP": mAP}
    return {
        "zsl": setting,
        "gzsl": setting,
        "chance_mAP": {"zsl": 9.0, "gzsl": 20.0},
        "step": 4,
        "num_test_images": 64,
        "mlflow_run_id": "child",
    }


def test_table_in_the_papers_layout_with_a_failed_row():
    table = {
        "k": [3, 5],
        "steps": 400,
        "workers": 2,
        "seed": 0,
        "data": "d",
        "rows": [
            {"title": "Fast0Tag", "status": "ok", **fake_metrics(41.25)},
            {"title": "CONSE", "status": "failed", "reason": "ValueError: a | b"},
        ],
    }
    lines = format_table_md(table).splitlines()
    assert lines[0] == "| method | ZSL K=3 | ZSL K=5 | ZSL mAP | GZSL K=3 | GZSL K=5 | GZSL mAP |"
    assert lines[2] == "| Fast0Tag | 20.6/20.6/20.6 | 20.6/20.6/20.6 | 41.2 | 20.6/20.6/20.6 | 20.6/20.6/20.6 | 41.2 |"
    assert lines[3].startswith("| CONSE: **failed**: ValueError: a \\| b | — |")
    assert lines[3].count(" | ") == 6
    assert "chance mAP (mean label frequency): ZSL 9.0, GZSL 20.0" in lines[-1]


def test_failure_reason_is_the_last_line_of_the_error():
    exc = RuntimeError("Training failed:\n  File 'x.py'\n    boom()\nValueError: shapes (3,) (4,)\n")
    assert failure_reason(exc) == "RuntimeError: ValueError: shapes (3,) (4,)"
    assert len(failure_reason(RuntimeError("x" * 1000))) == 300


def test_rows_are_the_models_then_the_ablations(monkeypatch):
    asked = {}
    monkeypatch.setattr(
        launch.compare,
        "run_compare",
        lambda config, variants, out, sets: asked.update(variants=variants, sets=sets) or {"rows": []},
    )
    main(
        [
            "compare",
            CONFIG,
            "--models",
            "conse",
            "lesa",
            "--ablations",
            "--out",
            "unused",
            "--set",
            "data.url=unused",
            "--set",
            "model.num_attentions=7",
        ]
    )
    assert [v.title for v in asked["variants"]] == [
        "CONSE",
        "LESA (M=7)",
        "LESA without L_dist",
        "LESA without L_rel",
        "LESA without L_div",
        "LESA (M=1)",
        "LESA (M=5)",
    ]
    assert asked["variants"][5].overrides == ["model.name=lesa", "model.num_attentions=1"]
    assert asked["sets"] == ["data.url=unused", "model.num_attentions=7"]


def test_a_failed_model_is_reported_and_the_others_still_run(tmp_path, monkeypatch):
    trained = []

    def fake_training(cfg, out, parent_run_id=None):
        trained.append((cfg.model.name, cfg.loss.dist, Path(out).name, parent_run_id))
        if cfg.model.name == "labelem":
            raise RuntimeError("worker died\nMemoryError: out of memory")
        return fake_metrics(50.0 if cfg.model.name == "lesa" else 30.0)

    monkeypatch.setattr(launch.driver, "run_training", fake_training)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    variants = model_variants(["labelem", "lesa"], 10) + ABLATIONS[:1]
    table = run_compare(CONFIG, variants, tmp_path / "cmp", ["data.url=unused", f"mlflow.tracking_uri={uri}"])

    parent_id = table["mlflow_parent_run_id"]
    assert trained == [
        ("labelem", 0.1, "labelem", parent_id),
        ("lesa", 0.1, "lesa", parent_id),
        ("lesa", 0.0, "lesa_no_dist", parent_id),
    ]
    saved = json.loads((tmp_path / "cmp" / "table.json").read_text())
    assert [(r["name"], r["status"]) for r in saved["rows"]] == [
        ("labelem", "failed"),
        ("lesa", "ok"),
        ("lesa_no_dist", "ok"),
    ]
    assert saved["rows"][0]["reason"] == "RuntimeError: MemoryError: out of memory"
    assert (
        "LabelEM: **failed**: RuntimeError: MemoryError: out of memory" in (tmp_path / "cmp" / "table.md").read_text()
    )
    client = MlflowClient(uri)
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["lesa/zsl/mAP"] == 50.0 and "labelem/zsl/mAP" not in parent.data.metrics
    assert {a.path for a in client.list_artifacts(parent_id)} == {"table.md", "table.json"}


def test_seeds_give_one_comparison_each_and_their_mean_table(tmp_path, monkeypatch):
    trained = []

    def fake_training(cfg, out, parent_run_id=None):
        trained.append((cfg.train.seed, cfg.model.name, Path(out).parent.name, cfg.mlflow.run_name))
        if cfg.model.name == "labelem" and cfg.train.seed == 2:
            raise RuntimeError("MemoryError: out of memory")
        return fake_metrics({"lesa": 40.0, "labelem": 20.0}[cfg.model.name] + cfg.train.seed)

    monkeypatch.setattr(launch.driver, "run_training", fake_training)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    main(
        [
            "compare",
            CONFIG,
            "--models",
            "lesa",
            "labelem",
            "--seeds",
            "0",
            "2",
            "--out",
            str(tmp_path / "cmp"),
            "--set",
            "data.url=unused",
            "--set",
            f"mlflow.tracking_uri={uri}",
            "--set",
            "mlflow.run_name=grid",
        ]
    )

    assert trained == [
        (0, "lesa", "seed0", "lesa"),
        (0, "labelem", "seed0", "labelem"),
        (2, "lesa", "seed2", "lesa"),
        (2, "labelem", "seed2", "labelem"),
    ]
    for seed in (0, 2):  # each seed is a whole comparison, with its own parent run
        per_seed = json.loads((tmp_path / "cmp" / f"seed{seed}" / "table.json").read_text())
        assert per_seed["seed"] == seed
        assert MlflowClient(uri).get_run(per_seed["mlflow_parent_run_id"]).info.run_name == f"grid-seed{seed}"
    table = json.loads((tmp_path / "cmp" / "table.json").read_text())
    assert table["seeds"] == [0, 2] and len(table["mlflow_parent_run_ids"]) == 2
    lesa, labelem = table["rows"]
    assert lesa["zsl"]["mAP"] == 41.0 and lesa["gzsl"]["F1@3"] == 20.5  # (40 + 42) / 2, (20 + 21) / 2
    assert [r["mAP"] for r in lesa["zsl_per_seed"]] == [40.0, 42.0]
    assert labelem["status"] == "failed" and labelem["reason"] == "seed 2: RuntimeError: MemoryError: out of memory"
    text = (tmp_path / "cmp" / "table.md").read_text()
    assert "| LESA (M=10) | 20.5/20.5/20.5 | 20.5/20.5/20.5 | 41.0 |" in text
    assert "mean over seeds 0, 2" in text and "LabelEM: **failed**: seed 2: RuntimeError" in text
    assert (
        "| method | ZSL mAP, seeds 0 / 2 | ZSL F1@3, seeds 0 / 2 | GZSL mAP, seeds 0 / 2 | GZSL F1@3, seeds 0 / 2 |"
        in text
    )
    assert "| LESA (M=10) | 40.0 / 42.0 | 20.0 / 21.0 | 40.0 / 42.0 | 20.0 / 21.0 |" in text


def test_seeds_refuse_a_used_folder_of_any_seed_before_training(tmp_path, monkeypatch):
    monkeypatch.setattr(launch.driver, "run_training", lambda *a, **k: pytest.fail("trained"))
    (tmp_path / "seed1" / "lesa").mkdir(parents=True)
    (tmp_path / "seed1" / "lesa" / "run.json").write_text("{}")
    with pytest.raises(ConfigError, match="seed1: lesa/ already holds a training run"):
        run_seeds(CONFIG, model_variants(["lesa"], 10), tmp_path, ["data.url=unused"], [0, 1])
    with pytest.raises(ConfigError, match="a seed is repeated"):
        run_seeds(CONFIG, model_variants(["lesa"], 10), tmp_path, ["data.url=unused"], [3, 3])


def test_compare_refuses_an_out_folder_that_holds_runs(tmp_path):
    (tmp_path / "lesa").mkdir()
    (tmp_path / "lesa" / "run.json").write_text("{}")
    with pytest.raises(ConfigError, match="lesa/ already holds a training run"):
        run_compare(CONFIG, [Variant("lesa", "LESA", ["model.name=lesa"])], tmp_path, ["data.url=unused"])


def test_a_bad_override_fails_before_anything_trains(tmp_path):
    with pytest.raises(ConfigError, match="model.name: unknown model"):
        run_compare(CONFIG, model_variants(["lesa", "fast1tag"], 10), tmp_path, ["data.url=unused"])
    assert not (tmp_path / "table.json").exists()
