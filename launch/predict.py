"""`lesa predict`: tag image files with a model that `lesa train --out DIR` wrote.

One process, plain torch, no Ray. DIR/config.json rebuilds the model, DIR/model.pt (a tensor
state dict, read with weights_only=True: nothing is unpickled) fills it, and every image is decoded
exactly as the training stream decodes it (`decode_image`: upright by its EXIF orientation, 16-bit
and float pixels scaled to 8 bits, short side resized, centre crop), so the model sees what it was
trained on.

Which labels are scored:
- by default every label of the dataset in the config (seen and unseen), with the dataset's vectors;
- with `--labels NAME ...` only those names, instead: a name the dataset has (case-insensitive)
  keeps the dataset's vector, the one the model was trained or evaluated with; any other name
  gets a vector from `--label-vectors` (datasets/makers/embeddings.py: GloVe/word2vec text, or a .npy
  with `--label-vector-names`; multi-word names average their known words).
An unreadable image and a name with no vector are reported on stderr by name, and the rest is
still predicted; the exit status is 1 only when nothing could be predicted.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import fsspec
import numpy as np
import torch

from datasets.contract import DatasetError, DatasetInfo, read_dataset
from datasets.images import CONVERT_FORMATS
from datasets.stream import BadSample, decode_image
from launch.preflight import preflight_predict
from trainer.config import Config, ConfigError, replaced
from trainer.evaluation.attention_maps import attention_items, file_name, render_sheet, top_labels, write_sheet
from trainer.models.backbones import BACKBONES, input_resample
from trainer.models.registry import build_model
from trainer.weights import WeightsError, read_state_dict

BATCH = 16  # images per forward pass
MAX_SHEET_LABELS = 10  # labels captioned on an overlay sheet, whatever --top-k is


@dataclass
class Vocabulary:
    """The labels scored: rows `ids` of `table`, the label-vector table the model is built over
    (the dataset's vectors first, so models that need the seen labels, CONSE, still find them;
    then the vectors of names the dataset does not have)."""

    names: list[str]
    roles: list[str]  # seen / unseen (the dataset's), or "new" (from --label-vectors)
    ids: np.ndarray  # int64 [n]
    table: np.ndarray  # float32 [rows, dim], raw: the model normalises


def warn(message: str) -> None:
    print(f"lesa predict: {message}", file=sys.stderr, flush=True)


# --- the model ----------------------------------------------------------------------------------


def read_state(url: str) -> dict[str, torch.Tensor]:
    try:
        return read_state_dict(url)
    except WeightsError as exc:
        raise ConfigError(str(exc)) from None


def backbone_source(cfg: Config, state: dict, info: DatasetInfo | None, url: str) -> tuple[Config, bool]:
    """The config to build the model from, and whether model.pt holds the backbone's weights. A
    model trained on cached features (a dataset of kind "feature") has none: predict then runs the
    frozen backbone the features came from, with model.backbone_weights (or the weights the
    feature dataset names), on the images. A backbone whose architecture is read from its weights
    (clip: the folder's config.json) keeps model.backbone_weights either way."""
    if any(k.startswith("backbone.") for k in state):
        if BACKBONES[cfg.model.backbone].shape_from_weights:
            return cfg, True  # built from the folder, then model.pt's tensors replace its weights
        return replaced(cfg, {"model.backbone_weights": None}), True  # model.pt has them: nothing to fetch
    weights = cfg.model.backbone_weights
    if weights is None and info is not None and info.features is not None:
        weights = info.features.weights
    if weights is None:
        raise ConfigError(
            f"{url}: holds no backbone weights (trained on cached features?); set "
            f"model.backbone_weights in its config.json to the {cfg.model.backbone} weights"
        )
    return replaced(cfg, {"model.backbone_weights": weights}), False


def load_model(
    cfg: Config,
    state: dict,
    vocabulary: Vocabulary,
    seen: np.ndarray | None,
    with_backbone: bool,
    url: str,
    device: torch.device,
):
    """The model of `cfg` (with its image backbone) and the weights of `state`, over `vocabulary`."""
    model = build_model(cfg, vocabulary.table, seen)
    weights = {k: v for k, v in state.items() if k != "label_vectors"}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [k for k in missing if k != "label_vectors" and (with_backbone or not k.startswith("backbone."))]
    if missing or unexpected:
        raise ConfigError(
            f"{url}: does not match model.name/model.backbone of its config.json "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    return model.to(device).eval()


def vector_dim(state: dict, info: DatasetInfo | None) -> int | None:
    """The label-vector size the model scores: from the saved vocabulary, else the dataset's."""
    if "label_vectors" in state:
        return int(state["label_vectors"].shape[1])
    return int(info.embeddings.shape[1]) if info is not None else None


# --- the labels ---------------------------------------------------------------------------------


def dataset_vocabulary(info: DatasetInfo) -> Vocabulary:
    return Vocabulary(
        [lab.name for lab in info.labels],
        [lab.role for lab in info.labels],
        np.arange(info.num_labels),
        info.embeddings,
    )


def requested_vocabulary(names: list[str], info: DatasetInfo | None, encoder, dim: int | None) -> Vocabulary:
    """The labels named on the command line, in that order, each once; a name with no vector is
    reported and left out."""
    known = {}
    for lab in info.labels if info is not None else []:
        known.setdefault(lab.name.casefold(), lab)
    unique = list(dict.fromkeys(names))
    new = [n for n in unique if n.casefold() not in known]
    encoded = {}
    if new and encoder is not None:
        if dim is not None and encoder.dim != dim:
            raise ConfigError(
                f"--label-vectors {encoder.source}: {encoder.dim}-d vectors, but the model scores {dim}-d label vectors"
            )
        vectors, absent = encoder.encode(new)
        encoded = {n: v for n, v in zip(new, vectors) if n not in set(absent)}
    width = dim or (encoder.dim if encoder is not None else 0)
    base = info.embeddings if info is not None else np.zeros((0, width), np.float32)
    chosen, roles, ids, extra = [], [], [], []
    for name in unique:
        if name.casefold() in known:
            lab = known[name.casefold()]
            chosen.append(name)
            roles.append(lab.role)
            ids.append(lab.index)
        elif name in encoded:
            chosen.append(name)
            roles.append("new")
            ids.append(len(base) + len(extra))
            extra.append(encoded[name])
        else:
            where = f"nor in {encoder.source}" if encoder is not None else "(pass --label-vectors to embed new names)"
            warn(f"label {name!r}: no vector: not a label of the dataset {where}; not scored")
    table = np.concatenate([base, np.stack(extra)]) if extra else base
    return Vocabulary(chosen, roles, np.array(ids, dtype=np.int64), table.astype(np.float32))


def open_dataset(url: str, needed: bool) -> DatasetInfo | None:
    """The dataset whose labels the model knows; without --labels it must be readable."""
    try:
        return read_dataset(url)
    except DatasetError as exc:
        if needed:
            raise
        warn(f"dataset {url} not readable, so --labels get vectors from --label-vectors only ({exc})")
        return None


# --- the images ---------------------------------------------------------------------------------


def read_image(path: str, size: int, resample: str = "bilinear") -> np.ndarray | None:
    """uint8 [size, size, 3] as training decodes it, or None after reporting why not."""
    try:
        with fsspec.open(path, "rb") as f:
            data = f.read()
    except (OSError, ValueError) as exc:
        warn(f"{path}: cannot read ({type(exc).__name__}: {exc}); skipped")
        return None
    try:
        # a user's photos may be TIFF, which shards never hold
        return decode_image(data, size, CONVERT_FORMATS, resample)
    except BadSample as exc:
        warn(f"{path}: not a readable image ({exc.detail}); skipped")
        return None


def print_prediction(path: str, scores: np.ndarray, vocabulary: Vocabulary, top_k: int) -> None:
    print(path)
    for rank, k in enumerate(top_labels(scores, top_k), start=1):
        print(f"  {rank:>3}  {scores[k]:9.4f}  {vocabulary.names[k]}  [{vocabulary.roles[k]}]")


# --- the command --------------------------------------------------------------------------------


def predict(
    checkpoint: str,
    images: list[str],
    labels: list[str] | None = None,
    label_vectors: str | None = None,
    label_vector_names: str | None = None,
    top_k: int = 10,
    overlays: str | None = None,
    device: str = "cpu",
    data: str | None = None,
) -> int:
    """Print the top-K labels of every readable image; the exit status (0, or 1 if nothing was predicted)."""
    from datasets.makers.embeddings import load_label_encoder

    model_url, cfg = preflight_predict(checkpoint, top_k, device)
    state = read_state(model_url)
    info = open_dataset(data or cfg.data.url, needed=not labels)
    encoder = load_label_encoder(label_vectors, label_vector_names) if label_vectors else None
    vocabulary = (
        requested_vocabulary(labels, info, encoder, vector_dim(state, info)) if labels else dataset_vocabulary(info)
    )
    if not vocabulary.names:
        warn("no label has a vector: nothing to predict")
        return 1
    cfg, with_backbone = backbone_source(cfg, state, info, model_url)
    model = load_model(
        cfg, state, vocabulary, info.seen if info is not None else None, with_backbone, model_url, torch.device(device)
    )
    label_ids = torch.as_tensor(vocabulary.ids, device=device)

    predicted, taken, no_attention = 0, set(), False
    for start in range(0, len(images), BATCH):
        good = [
            (p, a)
            for p in images[start : start + BATCH]
            if (a := read_image(p, cfg.data.image_size, input_resample(cfg.model))) is not None
        ]
        if not good:
            continue
        batch = torch.from_numpy(np.stack([a for _, a in good])).to(device)
        with torch.no_grad():
            out = model(batch, label_ids)
        scores = out.scores.float().cpu().numpy()
        for (path, _), row in zip(good, scores):
            print_prediction(path, row, vocabulary, min(top_k, len(vocabulary.names)))
        predicted += len(good)
        if overlays:
            items = attention_items(out, batch)
            if items is None:
                no_attention = True
                continue
            for (path, _), item in zip(good, items):
                sheet = render_sheet(item, vocabulary.names, Path(path).name, min(top_k, MAX_SHEET_LABELS))
                write_sheet(sheet, Path(overlays, file_name(Path(path).stem, taken)))
    if no_attention:
        warn(f"model.name {cfg.model.name} has no attention maps; no overlays written")
    elif overlays and predicted:
        print(f"attention overlays in {overlays}/", file=sys.stderr)
    if predicted == 0:
        warn("no image could be read: nothing predicted")
        return 1
    return 0
