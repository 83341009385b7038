"""trainer/config.py: YAML + --set overrides, validated up front, errors naming the dotted key;
a frozen Config; a module that imports nothing else of the project."""

from __future__ import annotations

import ast
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from trainer.config import Config, ConfigError, config_from_dict, load_config, parse_override, replaced

REPO = Path(__file__).resolve().parents[1]


def write_yaml(tmp_path: Path, data: dict, name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture
def base_yaml(tmp_path):
    return write_yaml(
        tmp_path,
        {
            "data": {"url": "/data/synth", "batch_size": 8},
            "model": {"backbone": "small_cnn", "num_attentions": 4},
            "optim": {"name": "adamw", "lr": 0.01},
            "train": {"max_steps": 50},
            "eval": {"k": [1, 3]},
        },
    )


def test_load_from_yaml(base_yaml):
    cfg = load_config(base_yaml)
    assert isinstance(cfg, Config)
    assert cfg.data.url == "/data/synth" and cfg.data.batch_size == 8
    assert cfg.model.num_attentions == 4 and cfg.model.backbone == "small_cnn"
    assert cfg.optim.name == "adamw" and cfg.optim.lr == 0.01
    assert cfg.train.max_steps == 50
    assert cfg.eval.k == [1, 3]
    # untouched keys keep their defaults
    assert cfg.data.image_size == 96 and cfg.train.seed == 0 and cfg.scaling.num_workers == 2
    assert (cfg.loss.rank, cfg.loss.dist, cfg.loss.rel, cfg.loss.div) == (1.0, 0.1, 0.001, 0.01)
    assert cfg.model.backbone_weights is None and cfg.mlflow.tracking_uri is None


def test_set_overrides(base_yaml):
    cfg = load_config(
        base_yaml,
        [
            "eval.k=[10,20]",
            "train.max_steps=7",
            "optim.lr=3.0e-4",
            "scaling.use_gpu=true",
            "model.adapter=false",
            "data.url=s3://bucket/root",
            "mlflow.run_name=my run",
            "deepspeed.bf16=True",
            "model.backbone_weights=/w/vgg.pth",
            "data.max_bad_fraction=0.5",
        ],
    )
    assert cfg.eval.k == [10, 20]
    assert cfg.train.max_steps == 7 and isinstance(cfg.train.max_steps, int)
    assert cfg.optim.lr == pytest.approx(3e-4) and isinstance(cfg.optim.lr, float)
    assert cfg.scaling.use_gpu is True and cfg.model.adapter is False and cfg.deepspeed.bf16 is True
    assert cfg.data.url == "s3://bucket/root"
    assert cfg.mlflow.run_name == "my run"
    assert cfg.model.backbone_weights == "/w/vgg.pth"
    assert cfg.data.max_bad_fraction == 0.5
    assert cfg.data.batch_size == 8  # from the file, not overridden


@pytest.mark.parametrize("text", ["1e-4", "1E-4", "1.0e4"])
def test_exponent_notation_for_float_fields(text):
    cfg = load_config(None, ["data.url=/x", f"optim.lr={text}"])
    assert cfg.optim.lr == float(text)


def test_set_overrides_later_wins_and_without_file():
    cfg = load_config(None, ["data.url=/a", "train.max_steps=3", "train.max_steps=9", "eval.k=5"])
    assert cfg.data.url == "/a" and cfg.train.max_steps == 9
    assert cfg.eval.k == [5]  # a scalar for a list field becomes a one-element list


def test_set_on_base_dict():
    cfg = load_config(base={"data": {"url": "/x"}}, overrides=["model.num_attentions=2"])
    assert cfg.data.url == "/x" and cfg.model.num_attentions == 2


def test_empty_section_in_yaml_is_defaults(tmp_path):
    cfg = load_config(write_yaml(tmp_path, {"data": {"url": "/x"}, "model": None}))
    assert cfg.model.name == "lesa" and cfg.model.num_attentions == 10


def test_set_into_empty_yaml_section(tmp_path):
    path = write_yaml(tmp_path, {"data": {"url": "/x"}, "model": None})
    cfg = load_config(path, ["model.num_attentions=3"])
    assert cfg.model.num_attentions == 3


def test_overrides_do_not_mutate_base():
    base = {"data": {"url": "/x"}, "model": {"num_attentions": 4}}
    load_config(base=base, overrides=["model.num_attentions=2", "data.url=/y"])
    assert base == {"data": {"url": "/x"}, "model": {"num_attentions": 4}}


def test_parse_override():
    assert parse_override("eval.k=[10, 20]") == (["eval", "k"], [10, 20])
    assert parse_override("a.b=c=d") == (["a", "b"], "c=d")
    assert parse_override("mlflow.run_name=") == (["mlflow", "run_name"], "")
    with pytest.raises(ConfigError, match="key=value"):
        parse_override("train.max_steps")


@pytest.mark.parametrize(
    "data, key",
    [
        ({"data": {"url": "/x"}, "bogus": 1}, "bogus"),
        ({"data": {"url": "/x", "bacth_size": 4}}, "data.bacth_size"),
        ({"data": {"url": "/x"}, "model": {"attentions": 3}}, "model.attentions"),
    ],
)
def test_unknown_key_in_yaml(tmp_path, data, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        load_config(write_yaml(tmp_path, data))


@pytest.mark.parametrize(
    "override, key",
    [
        ("trian.max_steps=3", "trian"),
        ("bogus=1", "bogus"),
        ("optim.learning_rate=0.1", "optim.learning_rate"),
        ("eval.kk=[1]", "eval.kk"),
    ],
)
def test_unknown_key_via_set(base_yaml, override, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        load_config(base_yaml, [override])


def test_set_into_a_value_is_an_error(base_yaml):
    with pytest.raises(ConfigError) as info:
        load_config(base_yaml, ["data.url.sub=1"])
    assert "url" in str(info.value)


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.max_steps=abc", "train.max_steps"),
        ("train.max_steps=1.5", "train.max_steps"),
        ("train.max_steps=true", "train.max_steps"),
        ("scaling.use_gpu=3", "scaling.use_gpu"),
        ("scaling.use_gpu=yes please", "scaling.use_gpu"),
        ("optim.lr=fast", "optim.lr"),
        ("optim.lr=true", "optim.lr"),
        ("eval.k=[1,x]", "eval.k[1]"),
        ("data.url=[1,2]", "data.url"),
        ("model=3", "model"),
    ],
)
def test_wrong_types(base_yaml, override, key):
    with pytest.raises(ConfigError) as info:
        load_config(base_yaml, [override])
    assert str(info.value).startswith(f"{key}:"), str(info.value)


@pytest.mark.parametrize(
    "override, key",
    [
        ("scaling.num_workers=0", "scaling.num_workers"),
        ("scaling.cpus_per_worker=-1", "scaling.cpus_per_worker"),
        ("eval.k=[0]", "eval.k"),
        ("eval.k=[5,-3]", "eval.k"),
        ("eval.k=[]", "eval.k"),
        ("eval.every=-1", "eval.every"),
        ("train.max_steps=0", "train.max_steps"),
        ("data.batch_size=0", "data.batch_size"),
        ("data.loader_workers=-1", "data.loader_workers"),
        ("data.max_bad_fraction=1.5", "data.max_bad_fraction"),
        ("optim.lr=0", "optim.lr"),
        ("loss.div=-0.01", "loss.div"),
        ("deepspeed.zero_stage=4", "deepspeed.zero_stage"),
        ("model.num_attentions=0", "model.num_attentions"),
    ],
)
def test_out_of_range(base_yaml, override, key):
    with pytest.raises(ConfigError) as info:
        load_config(base_yaml, [override])
    assert str(info.value).startswith(f"{key}:"), str(info.value)


def test_zero_loader_workers_and_zero_loss_weight_are_allowed(base_yaml):
    cfg = load_config(base_yaml, ["data.loader_workers=0", "loss.dist=0", "eval.every=0"])
    assert cfg.data.loader_workers == 0 and cfg.loss.dist == 0.0


def test_vgg19_needs_weights_only_where_it_runs_on_images(base_yaml):
    """The config alone cannot tell: on a feature dataset VGG-19 never runs. Building it from the
    config does run it, and refuses without weights (the driver and lesa extract check earlier,
    against the dataset: tests/integration/test_feature_cache.py)."""
    from trainer.models.backbones import build_backbone

    cfg = load_config(base_yaml, ["model.backbone=vgg19"])
    with pytest.raises(ConfigError, match="model.backbone_weights: .* vgg19 is frozen"):
        build_backbone(cfg.model)
    cfg = load_config(base_yaml, ["model.backbone=vgg19", "model.backbone_weights=/w/vgg19.pth"])
    assert cfg.model.backbone == "vgg19"


def test_missing_data_url(tmp_path):
    with pytest.raises(ConfigError, match="data.url"):
        load_config(write_yaml(tmp_path, {"train": {"max_steps": 5}}))
    with pytest.raises(ConfigError, match="data.url"):
        load_config(None, [])
    with pytest.raises(ConfigError, match="data.url"):
        load_config(write_yaml(tmp_path, {"data": {"url": ""}}))


def test_int_accepted_for_float_fields(base_yaml):
    cfg = load_config(base_yaml, ["optim.lr=1", "loss.rel=2", "data.max_bad_fraction=0"])
    assert cfg.optim.lr == 1.0 and type(cfg.optim.lr) is float
    assert cfg.loss.rel == 2.0 and type(cfg.loss.rel) is float
    assert type(cfg.data.max_bad_fraction) is float


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_round_trip_and_flat(base_yaml):
    cfg = load_config(base_yaml, ["eval.k=[10,20]", "mlflow.run_name=r1"])
    data = cfg.to_dict()
    assert data["eval"]["k"] == [10, 20] and data["model"]["name"] == "lesa"
    again = config_from_dict(data)
    assert again == cfg
    assert again.to_dict() == data
    flat = cfg.flat()
    assert flat["data.url"] == "/data/synth"
    assert flat["eval.k"] == [10, 20]
    assert flat["optim.lr"] == 0.01 and flat["mlflow.run_name"] == "r1"
    assert all(key.count(".") == 1 for key in flat)
    expected_keys = {f"{section}.{key}" for section, values in data.items() for key in values}
    assert set(flat) == expected_keys
    assert {"loss.rank", "scaling.use_gpu", "deepspeed.zero_stage", "checkpoint.storage"} <= set(flat)


def test_config_from_dict_rejects_unknown_keys(base_yaml):
    data = load_config(base_yaml).to_dict()
    data["train"]["epochs"] = 3
    with pytest.raises(ConfigError, match="'train.epochs'"):
        config_from_dict(data)


def test_shipped_synthetic_yaml():
    path = REPO / "launch" / "synthetic.yaml"
    cfg = load_config(path)
    assert cfg.data.url == "demo_out/data"
    assert cfg.model.name == "lesa" and cfg.model.backbone == "small_cnn" and cfg.model.num_attentions == 10
    assert (cfg.loss.rank, cfg.loss.dist, cfg.loss.rel, cfg.loss.div) == (1.0, 0.1, 0.001, 0.01)
    assert cfg.eval.k == [3, 5]
    assert cfg.scaling.num_workers == 2 and cfg.scaling.use_gpu is False
    assert cfg.deepspeed.zero_stage == 0
    assert cfg.mlflow.experiment == "lesa-synthetic"
    # and it accepts the overrides the e2e test and the Makefile use
    cfg = load_config(path, ["data.url=/tmp/d", "data.image_size=48", "train.max_steps=24", "eval.every=16"])
    assert (cfg.data.url, cfg.data.image_size, cfg.train.max_steps, cfg.eval.every) == ("/tmp/d", 48, 24, 16)


def test_a_config_refuses_assignment(base_yaml):
    cfg = load_config(base_yaml)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.data.url = "/elsewhere"
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.data = cfg.model
    assert cfg.data.url == "/data/synth"


def test_replaced_returns_a_new_config_and_leaves_the_old_one(base_yaml):
    cfg = load_config(base_yaml)
    new = replaced(cfg, {"data.url": "/abs/data", "checkpoint.storage": "s3://b/ck", "eval.overlays": 0})
    assert (new.data.url, new.checkpoint.storage, new.eval.overlays) == ("/abs/data", "s3://b/ck", 0)
    assert (cfg.data.url, cfg.checkpoint.storage, cfg.eval.overlays) == ("/data/synth", None, 4)
    assert new.model is cfg.model and new.data.batch_size == cfg.data.batch_size == 8
    assert config_from_dict(new.to_dict()) == new  # what a Ray worker rebuilds
    with pytest.raises(TypeError):
        replaced(cfg, {"data.bogus": 1})


def test_importing_the_config_imports_no_other_project_module():
    """The leaf of the import graph: a fresh interpreter that imports trainer.config holds no other
    module of trainer/, datasets/ or launch/ (the registries are checked in launch/preflight.py)."""
    code = (
        "import json, sys; import trainer.config; "
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('trainer', 'datasets', 'launch'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert json.loads(out) == ["trainer", "trainer.config"]


def project_imports(path: Path) -> set[str]:
    """The project modules a file imports, at the top or inside functions (TYPE_CHECKING too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return {name for name in found if name.split(".")[0] in ("trainer", "datasets", "launch")}


def test_config_imports_nothing_of_the_project_and_datasets_never_import_trainer():
    assert project_imports(REPO / "trainer" / "config.py") == set()
    files = [path for package in ("trainer", "datasets", "launch") for path in sorted((REPO / package).glob("*.py"))]
    assert len(files) > 30
    reaching_up = {
        str(path.relative_to(REPO)): sorted(name for name in project_imports(path) if name.startswith("trainer"))
        for path in files
        if path.parent.name == "datasets"
    }
    assert {path: names for path, names in reaching_up.items() if names} == {}
