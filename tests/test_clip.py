"""The `clip` backbone, the `clip-text:PATH` label encoder and clip_zeroshot against transformers'
own CLIPModel, on a tiny random CLIP folder (tests/tiny_clip.py), with every socket connection
refused while loading: nothing may be fetched. Unit level: no Ray (tests/integration/test_clip_e2e.py
runs them through the CLI)."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_clip import GRID, IMAGE_SIZE, JOINT_DIM, write_tiny_clip

from datasets.contract import DatasetError
from datasets.makers.clip_folder import CLIP_MEAN, CLIP_STD
from datasets.makers.clip_text import DEFAULT_TEMPLATES
from datasets.makers.embeddings import load_label_encoder
from trainer.config import ConfigError, ModelConfig, load_config
from trainer.models.backbones import ClipVision, build_backbone, check_weights

NAMES = ["red circle", "Blue  ring", "green x"]


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    return write_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny-clip")


@pytest.fixture
def offline(monkeypatch):
    """Every socket connection refused, as on a machine with no network."""

    def refuse(*args, **kwargs):
        raise OSError("network access attempted while loading CLIP")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def reference(folder):
    from transformers import CLIPModel

    return CLIPModel.from_pretrained(folder, local_files_only=True).eval()


def pixels(images: torch.Tensor) -> torch.Tensor:
    """CLIP's own normalisation of uint8 [B, H, W, 3] images, as its image processor does it."""
    x = images.permute(0, 3, 1, 2).float() / 255
    return (x - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)


def test_regions_are_clips_projected_patch_tokens(clip_folder, offline):
    images = torch.randint(
        0, 256, (3, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1)
    )
    cfg = ModelConfig(backbone="clip", backbone_weights=str(clip_folder))
    backbone, global_feature = build_backbone(cfg), build_backbone(cfg, class_token=True)
    assert not backbone.trainable and not any(p.requires_grad for p in backbone.parameters())
    with torch.no_grad():
        fmap, embedding = backbone(images), global_feature(images)
        clip = reference(clip_folder)
        hidden = clip.vision_model(pixel_values=pixels(images)).last_hidden_state
        tokens = clip.visual_projection(clip.vision_model.post_layernorm(hidden))
        image_features = clip.get_image_features(pixel_values=pixels(images)).pooler_output
    assert fmap.shape == (3, JOINT_DIM, GRID, GRID) and backbone.out_channels == JOINT_DIM
    rows = fmap.flatten(2).transpose(1, 2)  # r = row * w + col, as the patches lie
    torch.testing.assert_close(rows, tokens[:, 1:], rtol=1e-4, atol=1e-5)
    assert embedding.shape == (3, JOINT_DIM, 1, 1)
    torch.testing.assert_close(embedding.flatten(1), image_features, rtol=1e-4, atol=1e-5)
    assert rows.std() > 0.1 * rows.abs().max()  # a real signal


def test_statistics_come_from_the_folders_preprocessor_config(clip_folder, tmp_path):
    folder = tmp_path / "clip"
    shutil.copytree(clip_folder, folder)
    (folder / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5] * 3, "image_std": [0.25] * 3}))
    backbone = ClipVision(str(folder))
    white = torch.full((1, IMAGE_SIZE, IMAGE_SIZE, 3), 255, dtype=torch.uint8)
    assert torch.allclose(backbone.normalise(white), torch.full((1, 3, IMAGE_SIZE, IMAGE_SIZE), 2.0))


def test_trainable_tower_with_activation_checkpointing_has_the_same_gradients(clip_folder):
    images = torch.randint(0, 256, (2, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=torch.uint8)
    grads = []
    for checkpointing in (False, True):
        cfg = ModelConfig(
            backbone="clip",
            backbone_weights=str(clip_folder),
            freeze_backbone=False,
            activation_checkpointing=checkpointing,
        )
        backbone = build_backbone(cfg)
        backbone.train()
        assert backbone.trainable and backbone.training
        layers = [m for m in backbone.tower.encoder.modules() if hasattr(m, "gradient_checkpointing")]
        assert layers and all(m.gradient_checkpointing == checkpointing for m in layers)
        (backbone(images) ** 2).sum().backward()
        grads.append({n: p.grad for n, p in backbone.named_parameters()})
        assert all(g is not None for g in grads[-1].values())
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_label_vectors_are_the_normalised_mean_over_templates(clip_folder, offline):
    encoder = load_label_encoder(f"clip-text:{clip_folder}")
    assert encoder.dim == JOINT_DIM
    vectors, missing = encoder.encode(NAMES)
    assert missing == [] and vectors.shape == (3, JOINT_DIM)
    from transformers import AutoTokenizer

    clip, tokenizer = reference(clip_folder), AutoTokenizer.from_pretrained(clip_folder, local_files_only=True)
    for name, vector in zip(NAMES, vectors):
        prompts = [t.format(" ".join(name.split())) for t in DEFAULT_TEMPLATES]
        tokens = tokenizer(prompts, padding=True, return_tensors="pt")
        with torch.no_grad():
            features = clip.get_text_features(**tokens).pooler_output
        mean = torch.nn.functional.normalize(features, dim=1).mean(0)
        np.testing.assert_allclose(vector, (mean / mean.norm()).numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)


def test_prompt_template_file(clip_folder, tmp_path):
    templates = tmp_path / "templates.txt"
    templates.write_text("a photo of a {}.\n\nan icon of a {}.\n")
    encoder = load_label_encoder(f"clip-text:{clip_folder}", templates=str(templates))
    assert encoder.templates == ("a photo of a {}.", "an icon of a {}.")
    assert encoder.encode(["red circle"])[0].shape == (1, JOINT_DIM)
    templates.write_text("a photo of a {}.\na photo\n")
    with pytest.raises(DatasetError, match=r"templates.txt: each line must be one template .*'a photo'"):
        load_label_encoder(f"clip-text:{clip_folder}", templates=str(templates))
    with pytest.raises(DatasetError, match="prompt templates go with a clip-text:PATH encoder"):
        load_label_encoder("glove.txt", templates=str(templates))


@pytest.mark.parametrize(
    "damage, message",
    [
        ("missing", r"model.backbone_weights: .*/clip does not exist"),
        ("no-config", r"/clip: no config.json; expected a CLIP checkpoint folder"),
        ("vgg", r"/clip/config.json: model_type 'vgg', expected 'clip'"),
        ("pickled", r"/clip: no model.safetensors \(pytorch_model.bin is pickled and never loaded"),
        ("file", r"/clip: not a folder"),
    ],
)
def test_a_wrong_weights_folder_is_one_line_before_anything_loads(clip_folder, tmp_path, damage, message):
    folder = tmp_path / "clip"
    if damage == "file":
        folder.write_text("not a folder")
    elif damage != "missing":
        shutil.copytree(clip_folder, folder)
    if damage == "no-config":
        (folder / "config.json").unlink()
    if damage == "vgg":
        (folder / "config.json").write_text(json.dumps({"model_type": "vgg"}))
    if damage == "pickled":
        (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    cfg = ModelConfig(backbone="clip", backbone_weights=str(folder))
    with pytest.raises(ConfigError, match=message) as info:
        check_weights(cfg, "data.url", IMAGE_SIZE)
    assert "\n" not in str(info.value)
    with pytest.raises(DatasetError, match=message.split(": ", 1)[-1] if damage != "missing" else "."):
        load_label_encoder(f"clip-text:{folder}")


def test_preflight_checks_the_towers_image_size_and_freezing(clip_folder):
    cfg = ModelConfig(backbone="clip", backbone_weights=str(clip_folder))
    with pytest.raises(ConfigError, match=f"data.image_size: 224, but the CLIP tower .* takes {IMAGE_SIZE} px"):
        check_weights(cfg, "data.url", 224)
    from datasets.contract import FeatureSpec
    from trainer.models.backbones import check_features

    spec = FeatureSpec(backbone="clip", weights=None, image_size=IMAGE_SIZE, grid=(GRID, GRID), channels=JOINT_DIM)
    check_features(cfg, IMAGE_SIZE, spec, "features/")
    trained = ModelConfig(backbone="clip", freeze_backbone=False)
    with pytest.raises(ConfigError, match="model.freeze_backbone: features/ holds cached features of a frozen clip"):
        check_features(trained, IMAGE_SIZE, spec, "features/")
    with pytest.raises(ConfigError, match="model.freeze_backbone: vgg19 is always frozen"):
        check_weights(ModelConfig(backbone="vgg19", freeze_backbone=False), "data.url", 224)
    with pytest.raises(ConfigError, match=r"model.freeze_backbone: small_cnn is always trained \(small_cnn_frozen"):
        check_weights(ModelConfig(backbone="small_cnn", freeze_backbone=True), "data.url", 96)


def test_clip_zeroshot_scores_the_cosine_of_clips_image_embedding(clip_folder, synthetic):
    from datasets.contract import read_dataset
    from trainer.models.registry import build_model, loss_weights

    info = read_dataset(str(synthetic(seed=0, image_size=IMAGE_SIZE, shard_size=8, train=8, test=8)))
    cfg = load_config(
        None,
        ["data.url=x", "model.name=clip_zeroshot", "model.backbone=clip", f"model.backbone_weights={clip_folder}"],
    )
    model = build_model(cfg, info.embeddings, info.seen)
    assert loss_weights(cfg) == {} and not any(p.requires_grad for p in model.parameters())
    images = torch.randint(0, 256, (2, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=torch.uint8)
    ids = torch.arange(len(info.labels))
    with torch.no_grad():
        scores = model(images, ids).scores
        image = reference(clip_folder).get_image_features(pixel_values=pixels(images)).pooler_output
    vectors = torch.nn.functional.normalize(torch.as_tensor(info.embeddings), dim=1)
    expected = torch.nn.functional.normalize(image, dim=1) @ vectors.T
    torch.testing.assert_close(scores, expected, rtol=1e-4, atol=1e-5)


def test_the_clip_code_never_imports_torchvision(clip_folder):
    code = f"""
import sys, torch
from trainer.config import ModelConfig
from trainer.models.backbones import build_backbone
from datasets.makers.embeddings import load_label_encoder
backbone = build_backbone(ModelConfig(backbone="clip", backbone_weights={str(clip_folder)!r}))
backbone(torch.zeros(1, {IMAGE_SIZE}, {IMAGE_SIZE}, 3, dtype=torch.uint8))
load_label_encoder("clip-text:{clip_folder}").encode(["red circle"])
assert "transformers" in sys.modules
print(sorted(m for m in sys.modules if m.split(".")[0] in ("torchvision", "timm", "open_clip")))
"""
    repo = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=repo)
    assert out.stdout.strip() == "[]", out.stdout


def test_embed_labels_writes_the_npy_and_names_pair_that_convert_reads(clip_folder, tmp_path, capsys):
    from launch import cli

    names = tmp_path / "names.txt"
    names.write_text("red circle\n\nhot air balloon\n")
    out = tmp_path / "vectors.npy"
    assert cli.main(["embed-labels", str(names), "--encoder", f"clip-text:{clip_folder}", "--out", str(out)]) == 0
    assert (tmp_path / "vectors.txt").read_text() == "red circle\nhot air balloon\n"
    direct = load_label_encoder(f"clip-text:{clip_folder}").encode(["red circle", "hot air balloon"])[0]
    np.testing.assert_array_equal(np.load(out, allow_pickle=False), direct)
    reread, missing = load_label_encoder(str(out), str(tmp_path / "vectors.txt")).encode(["Hot air balloon"])
    assert missing == [] and np.array_equal(reread[0], direct[1])
    assert cli.main(["embed-labels", str(names), "--encoder", f"clip-text:{tmp_path}/none", "--out", str(out)]) == 2
    assert f"{tmp_path}/none: not a folder" in capsys.readouterr().err


def test_only_a_model_that_trains_nothing_is_evaluated_without_a_checkpoint(clip_folder, synthetic):
    from datasets.contract import read_dataset
    from launch.preflight import check_trains, evaluation_checkpoint

    info = read_dataset(str(synthetic(seed=0, image_size=IMAGE_SIZE, shard_size=8, train=8, test=8)))
    clip = ["data.url=x", "model.backbone=clip", f"model.backbone_weights={clip_folder}"]
    zero_shot, lesa = load_config(None, [*clip, "model.name=clip_zeroshot"]), load_config(None, clip)
    assert evaluation_checkpoint(None, zero_shot, info) is None
    with pytest.raises(ConfigError, match="--checkpoint: clip_zeroshot trains nothing and takes no checkpoint"):
        evaluation_checkpoint("model.pt", zero_shot, info)
    with pytest.raises(ConfigError, match="--checkpoint: model.name lesa is trained; give the model.pt"):
        evaluation_checkpoint(None, lesa, info)
    with pytest.raises(ConfigError, match="model.name: clip_zeroshot trains nothing; evaluate it with lesa evaluate"):
        check_trains(zero_shot)
    check_trains(lesa)


def test_a_model_pt_of_a_clip_run_is_checked_on_the_meta_device(clip_folder, synthetic, tmp_path):
    """lesa evaluate's pre-flight builds the model on the meta device: the tower from config.json
    alone, its weights unread."""
    from datasets.contract import read_dataset
    from launch.preflight import evaluation_checkpoint
    from trainer.models.registry import build_model

    info = read_dataset(str(synthetic(seed=0, image_size=IMAGE_SIZE, shard_size=8, train=8, test=8)))
    cfg = load_config(None, ["data.url=x", "model.backbone=clip", f"model.backbone_weights={clip_folder}"])
    torch.save(build_model(cfg, info.embeddings, info.seen).state_dict(), tmp_path / "model.pt")
    assert evaluation_checkpoint(str(tmp_path), cfg, info) == str(tmp_path / "model.pt")


def test_the_stream_gives_clip_the_pixels_of_clips_own_image_processor(clip_folder):
    """Bicubic short-side resize, centre crop, CLIP's statistics: the stream's decode and the
    backbone's normalisation equal transformers' CLIPImageProcessorPil (bilinear would not)."""
    import io

    from PIL import Image
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from datasets.stream import decode_image
    from trainer.models.backbones import input_resample

    assert input_resample(ModelConfig(backbone="clip")) == "bicubic"
    assert input_resample(ModelConfig(backbone="vgg19")) == "bilinear"
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 256, (120, 150, 3), dtype=np.uint8))
    png = io.BytesIO()
    picture.save(png, "PNG")
    size = {"shortest_edge": IMAGE_SIZE}
    crop = {"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    expected = CLIPImageProcessorPil(size=size, crop_size=crop)(images=picture, return_tensors="pt")["pixel_values"]
    backbone = ClipVision(str(clip_folder))
    for resample, tolerance in (("bicubic", 1e-5), ("bilinear", None)):
        pixels = backbone.normalise(torch.from_numpy(decode_image(png.getvalue(), IMAGE_SIZE, resample=resample))[None])
        error = (pixels - expected).abs().max().item()
        assert error < tolerance if tolerance else error > 0.1, (resample, error)


def test_a_conversion_takes_clip_text_vectors(clip_folder):
    """`lesa convert ... --vectors clip-text:PATH`: the converters' label_vectors, checked rows."""
    from datasets.makers.embeddings import label_vectors

    names = ["red circle", "blue ring"]
    vectors = label_vectors(names, f"clip-text:{clip_folder}", None, None, "error", log=lambda *a: None)
    np.testing.assert_array_equal(vectors, load_label_encoder(f"clip-text:{clip_folder}").encode(names)[0])


def test_predict_tags_with_a_clip_model_and_clip_text_vectors_for_new_names(clip_folder, synthetic, tmp_path, capsys):
    """`lesa predict` on a clip run's folder (config.json + model.pt): the tower is built from the
    CLIP folder and model.pt's tensors fill it; new names get clip-text vectors."""
    from PIL import Image

    from datasets.contract import read_dataset
    from launch import cli
    from trainer.models.registry import build_model

    data = synthetic(seed=0, image_size=IMAGE_SIZE, shard_size=8, train=8, test=8)
    cfg = load_config(
        None,
        [
            f"data.url={data}",
            f"data.image_size={IMAGE_SIZE}",
            "model.backbone=clip",
            f"model.backbone_weights={clip_folder}",
        ],
    )
    info = read_dataset(str(data))
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(cfg.to_dict()))
    torch.save(build_model(cfg, info.embeddings, info.seen).state_dict(), run / "model.pt")
    Image.fromarray(np.full((120, 100, 3), 200, np.uint8)).save(tmp_path / "photo.png")
    argv = ["predict", str(tmp_path / "photo.png"), "--checkpoint", str(run), "--top-k", "2"]
    new = ["--labels", "hot air balloon", "red circle", "--label-vectors", f"clip-text:{clip_folder}"]
    assert cli.main([*argv, *new]) == 0
    out = capsys.readouterr().out
    assert "photo.png" in out and "hot air balloon" in out and "new" in out
