"""A CLIP checkpoint folder in Hugging Face format, opened offline: the `clip` backbone's image tower
(trainer/models/clip.py) and the `clip-text:PATH` label encoder (datasets/makers/clip_text.py).

The folder is what `CLIPModel.save_pretrained` writes: `config.json` (model_type "clip"; ViT-B/32,
B/16 or L/14 come from its vision_config) and `model.safetensors` (or a sharded
`model.safetensors.index.json`), optionally `preprocessor_config.json` (the image mean and std)
and the tokenizer files. It is given as a path or any fsspec URL; a URL is copied once into a
local cache. Loading is local files only, with the Hub switched off: nothing is ever downloaded,
and pickled `pytorch_model.bin` weights are refused (safetensors only).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import fsspec

from datasets.contract import DatasetError

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's RGB statistics, on a 0-1 scale
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
INSTALL = "pip install -c constraints.txt -e '.[clip]'"


def check_clip_folder(url: str) -> dict:
    """The folder's config.json, after checking (without reading the weights) that `url` is a CLIP
    checkpoint folder; a one-line DatasetError naming the folder and the fix otherwise."""
    fs, path = fsspec.core.url_to_fs(url)
    path = path.rstrip("/")
    if not fs.isdir(path):
        raise DatasetError(
            f"{url}: not a folder; expected a CLIP checkpoint folder as CLIPModel.save_pretrained writes it"
        )
    names = {p.rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)}
    if "config.json" not in names:
        raise DatasetError(
            f"{url}: no config.json; expected a CLIP checkpoint folder as CLIPModel.save_pretrained writes it"
        )
    with fs.open(f"{path}/config.json", "r") as f:
        try:
            config = json.load(f)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{url}/config.json: not JSON ({exc})") from None
    if not isinstance(config, dict) or config.get("model_type") != "clip":
        kind = config.get("model_type") if isinstance(config, dict) else None
        raise DatasetError(f"{url}/config.json: model_type {kind!r}, expected 'clip' (a CLIPModel folder)")
    if not names & set(WEIGHT_FILES):
        pickled = " (pytorch_model.bin is pickled and never loaded: re-save with safe_serialization)" * (
            "pytorch_model.bin" in names
        )
        raise DatasetError(f"{url}: no model.safetensors{pickled}")
    return config


def local_folder(url: str) -> str:
    """A local path holding the folder: `url` itself when local, else a copy in the cache
    ($XDG_CACHE_HOME/lesa/clip/<hash of the URL>), made once and renamed into place whole, so
    concurrent workers never read a half-copied folder."""
    fs, path = fsspec.core.url_to_fs(url)
    if "file" in fs.protocol or "local" in fs.protocol:
        return path
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lesa" / "clip"
    target = cache / hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:16]
    if not target.is_dir():
        cache.mkdir(parents=True, exist_ok=True)
        staging = tempfile.mkdtemp(dir=cache, prefix=".copy-")
        fs.get(path.rstrip("/") + "/", staging, recursive=True)
        try:
            os.rename(staging, target)
        except OSError:  # another worker finished its copy first: use that one
            shutil.rmtree(staging, ignore_errors=True)
    return str(target)


def image_statistics(folder: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) on a 0-1 scale: the folder's preprocessor_config.json, else CLIP's own."""
    try:
        with open(Path(folder) / "preprocessor_config.json") as f:
            pre = json.load(f)
        return tuple(map(float, pre["image_mean"])), tuple(map(float, pre["image_std"]))
    except (FileNotFoundError, KeyError, TypeError, ValueError):
        return CLIP_MEAN, CLIP_STD


def transformers_offline():
    """transformers, imported with the Hub off (the variables are read at import time)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        import transformers
    except ImportError:
        raise DatasetError(f"CLIP needs the optional extra: {INSTALL}") from None
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()  # the load report lists the tower it does not need
    return transformers


def load_clip_model(url: str):
    """CLIPModel in float32 from the folder at `url` (checked, local or copied), local files only.
    Under a meta-device context (a pre-flight that needs only the shapes) it is built from
    config.json alone, and the weights are not read."""
    import torch

    check_clip_folder(url)
    folder = local_folder(url)
    transformers = transformers_offline()
    if torch.empty(0).device.type == "meta":
        config = transformers.CLIPConfig.from_pretrained(folder, local_files_only=True)
        return transformers.CLIPModel(config), folder
    model = transformers.CLIPModel.from_pretrained(
        folder, local_files_only=True, use_safetensors=True, dtype=torch.float32
    )
    return model, folder


def load_clip_tokenizer(folder: str, url: str):
    transformers = transformers_offline()
    try:
        return transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, TypeError) as exc:
        raise DatasetError(f"{url}: no usable CLIP tokenizer files ({type(exc).__name__}: {exc})") from None
