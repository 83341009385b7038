"""Attention overlays: where each of LESA's M shared attentions looks, and which labels use it.

LESA scores label k with the best of its M attentions, s_k = max_m s_{m,k} (docs/protocol.md, The head, step
5), so every label *selects* one attention: argmax_m s_{m,k}. One PNG per image shows that:

    +---------+---------+---------+-- ... --+
    |  image  |  att 0  |  att 1  |         |    the M maps: softmax over the R = h*w regions,
    | top-K   | labels  | labels  |         |    upsampled onto the image as a heat overlay
    | labels  | that    | that    |         |
    |         | chose 0 | chose 1 |         |    under each map: the top-K labels that chose it
    | true    |         |         |         |    in a run's sheets, under the image: its true
    | labels  |         |         |         |    labels with their score and rank
    +---------+---------+---------+-- ... --+

PIL and numpy only. Models whose head has no attention (the holistic baselines) return no
"attention" in their output and get no overlays (`attention_outputs` returns None).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from trainer.config import Config

TILE = 160  # side of one tile in pixels; synthetic images are 96 px, so they are enlarged
COLUMNS = 6  # tiles per row: the image + 5 maps, then the next row
LINE = 15  # caption line height in pixels (fixed, so the sheet size never depends on the font)
PAD = 4
FONT_SIZE = 12
TRUE_LABELS = 5  # true labels listed under an image (more are counted), so all sheets have one size
# A perceptually ordered dark-blue -> red -> yellow ramp (black-body-like); positions in [0, 1].
HEAT_STOPS = np.array([0.0, 0.35, 0.7, 1.0])
HEAT_COLOURS = np.array([[20, 20, 120], [200, 30, 60], [250, 140, 20], [255, 255, 120]], dtype=np.float32)


@dataclass
class ImageAttention:
    """One image's head outputs, on the CPU: everything a sheet needs."""

    image: np.ndarray  # uint8 [S, S, 3], as the model saw it (decode_image)
    attention: np.ndarray  # float [M, R]: softmax over regions per attention
    scores: np.ndarray  # float [K]: s_k = max_m s_{m,k}
    attention_scores: np.ndarray  # float [M, K]: s_{m,k}


@torch.no_grad()
def attention_outputs(model, images: torch.Tensor, label_ids: torch.Tensor) -> list[ImageAttention] | None:
    """Run the model in inference mode on uint8 images [B, S, S, 3]; None if it has no attention."""
    was_training = model.training
    model.eval()
    try:
        out = model(images, label_ids)
    finally:
        model.train(was_training)
    return attention_items(out, images)


def attention_items(out: dict, images: torch.Tensor) -> list[ImageAttention] | None:
    """Per-image pieces of a head's output for `images`; None if the head has no attention."""
    if out.attention is None:
        return None
    attention, scores, per_attention = (
        getattr(out, k).float().cpu().numpy() for k in ("attention", "scores", "attention_scores")
    )
    return [
        ImageAttention(images[i].cpu().numpy(), attention[i], scores[i], per_attention[i]) for i in range(len(images))
    ]


def top_labels(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k best scores, best first; ties go to the lower index (as evaluation does)."""
    return np.argsort(-scores, kind="stable")[:k]


def selected_attention(attention_scores: np.ndarray) -> np.ndarray:
    """[M, K] per-attention scores -> [K]: the attention each label's score came from."""
    return np.argmax(attention_scores, axis=0)


def region_grid(num_regions: int) -> int:
    """Side of the backbone's square region grid (images are square centre crops)."""
    side = math.isqrt(num_regions)
    if side * side != num_regions:
        raise ValueError(f"{num_regions} attention regions do not form a square grid")
    return side


def heat_colours(values: np.ndarray) -> np.ndarray:
    """float [..] in [0, 1] -> uint8 [.., 3] on the heat ramp."""
    rgb = [np.interp(values, HEAT_STOPS, HEAT_COLOURS[:, c]) for c in range(3)]
    return np.stack(rgb, axis=-1).round().astype(np.uint8)


def overlay(image: np.ndarray, attention: np.ndarray, tile: int = TILE) -> Image.Image:
    """The image at tile x tile with one attention map [R] blended on it as heat.

    Softmax weights over 144 or 196 regions are tiny and alike in absolute terms, so each map is
    stretched to its own [min, max]; but a nearly uniform map (an untrained one, or one that looks
    everywhere) would then show noise at full strength, so the overlay's opacity also scales with
    the map's contrast, 1 - min/max: a uniform map leaves the image as it is."""
    side = region_grid(attention.size)
    weights = attention.reshape(side, side).astype(np.float32)
    lo, hi = float(weights.min()), float(weights.max())
    contrast = 1.0 - lo / max(hi, 1e-12)
    weights = (weights - lo) / max(hi - lo, 1e-12)
    heat = np.asarray(Image.fromarray(weights).resize((tile, tile), Image.BILINEAR))
    heat = np.clip(heat, 0.0, 1.0)
    base = np.asarray(Image.fromarray(image).resize((tile, tile), Image.BILINEAR), dtype=np.float32)
    alpha = (contrast * (0.15 + 0.6 * heat))[..., None]
    blended = base * (1 - alpha) + heat_colours(heat).astype(np.float32) * alpha
    return Image.fromarray(blended.round().astype(np.uint8))


def cell_height(top_k: int, with_truth: bool, tile: int = TILE) -> int:
    """A tile and its caption lines: a title, K labels, and with the truth its title and labels."""
    lines = 1 + top_k + (1 + TRUE_LABELS if with_truth else 0)
    return tile + PAD + lines * LINE + PAD


def sheet_size(num_maps: int, top_k: int, with_truth: bool = False, tile: int = TILE) -> tuple[int, int]:
    """(width, height) of the PNG for M maps, K caption labels, and the true labels if listed."""
    tiles = num_maps + 1
    columns = min(tiles, COLUMNS)
    rows = math.ceil(tiles / columns)
    return columns * (tile + PAD) + PAD, rows * cell_height(top_k, with_truth, tile) + PAD


def font() -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=FONT_SIZE)  # FreeType's built-in font when available
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def fit(draw: ImageDraw.ImageDraw, text: str, width: int, face) -> str:
    """`text`, shortened with '...' until it fits `width` pixels."""
    if draw.textlength(text, font=face) <= width:
        return text
    while text and draw.textlength(text + "...", font=face) > width:
        text = text[:-1]
    return text + "..."


def truth_lines(item: ImageAttention, names: list[str], truth: np.ndarray) -> list[tuple[str, str]]:
    """The image's true labels, best ranked first, each with its score and rank among all labels
    scored (#1 is the top prediction); past TRUE_LABELS the rest are counted."""
    order = top_labels(item.scores, item.scores.size)
    rank = np.empty(order.size, dtype=np.int64)
    rank[order] = np.arange(1, order.size + 1)
    ranked = sorted(truth.tolist(), key=lambda k: rank[k])
    shown = ranked if len(ranked) <= TRUE_LABELS else ranked[: TRUE_LABELS - 1]
    lines = [(f"true labels: {len(ranked)}", "rank")]
    lines += [(names[k], f"{item.scores[k]:.2f} #{rank[k]}") for k in shown]
    if len(shown) < len(ranked):
        lines.append((f"and {len(ranked) - len(shown)} more", ""))
    return lines


def sheet_captions(
    item: ImageAttention,
    names: list[str],
    title: str,
    top_k: int,
    marks: list[str] | None = None,
    truth: np.ndarray | None = None,
) -> list[list[tuple[str, str]]]:
    """Caption lines of the M + 1 tiles, each line (text, right-aligned text). The image's tile lists
    the top-K labels with their score and chosen attention, then the true labels (`truth`: their
    indices) when known; tile m + 1 lists the top labels that chose map m."""
    top = top_labels(item.scores, min(top_k, item.scores.size))
    chosen = selected_attention(item.attention_scores)

    def label_line(k: int, with_attention: bool) -> tuple[str, str]:
        mark = f"{marks[k]} " if marks else ""
        where = f" a{chosen[k]}" if with_attention else ""
        return f"{mark}{names[k]}", f"{item.scores[k]:.2f}{where}"

    captions = [[(title, "")] + [label_line(k, True) for k in top]]
    if truth is not None:
        captions[0] += [("", "")] * (top_k - len(top)) + truth_lines(item, names, truth)
    captions += [
        [(f"attention a{m}", "")] + [label_line(k, False) for k in top if chosen[k] == m]
        for m in range(item.attention.shape[0])
    ]
    return captions


def render_sheet(
    item: ImageAttention,
    names: list[str],
    title: str,
    top_k: int = 5,
    marks: list[str] | None = None,
    truth: np.ndarray | None = None,
    tile: int = TILE,
) -> Image.Image:
    """The overlay sheet of one image. `names[k]` is label k's display name; `marks[k]`, if given,
    a short prefix such as '+' for a true label; `truth`, if given, the true labels' indices."""
    num_maps = item.attention.shape[0]
    width, height = sheet_size(num_maps, top_k, truth is not None, tile)
    sheet = Image.new("RGB", (width, height), "white")
    draw, face = ImageDraw.Draw(sheet), font()
    columns = min(num_maps + 1, COLUMNS)
    cell_h = cell_height(top_k, truth is not None, tile)
    pictures = [Image.fromarray(item.image).resize((tile, tile), Image.BILINEAR)]
    pictures += [overlay(item.image, item.attention[m], tile) for m in range(num_maps)]
    captions = sheet_captions(item, names, title, top_k, marks, truth)
    for i, (picture, lines) in enumerate(zip(pictures, captions)):
        x = PAD + (i % columns) * (tile + PAD)
        y = PAD + (i // columns) * cell_h
        sheet.paste(picture, (x, y))
        for j, (left, right) in enumerate(lines):
            # The name is what gets shortened; the score and attention always show in full.
            ty = y + tile + PAD + j * LINE
            right_w = draw.textlength(right, font=face)
            draw.text((x, ty), fit(draw, left, tile - right_w - (PAD if right else 0), face), fill="black", font=face)
            draw.text((x + tile - right_w, ty), right, fill="black", font=face)
    return sheet


def file_name(key: str, taken: set[str]) -> str:
    """A PNG name from an image key or file name, safe on any filesystem and not yet in `taken`."""
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", key) or "image"
    name, n = f"{stem}.png", 1
    while name in taken:
        n += 1
        name = f"{stem}-{n}.png"
    taken.add(name)
    return name


def write_sheet(sheet: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path, format="PNG")


def eval_overlay_files(model, info, cfg: Config, device) -> dict:
    """{'attention/<key>.png': writer} for the first `eval.overlays` images of the eval split, scored
    against all labels (GZSL); {} when disabled or when the model has no attention. Rank 0 calls it
    alone at the end of a run, so it must not take part in collectives: it reads the split itself
    (one loader, no workers) and calls the model directly. Pictures are extras: a failure here is
    printed and the run still ends with its model and metrics."""
    if cfg.eval.overlays <= 0:
        return {}
    if getattr(info, "features", None) is not None:
        print(
            "attention overlays skipped: a feature dataset holds no images to draw the maps on "
            "(`lesa predict --overlays` on the image files draws them)",
            flush=True,
        )
        return {}
    try:
        return render_eval_overlays(model, info, cfg, device)
    except Exception as exc:  # noqa: BLE001 - never lose a finished run over its pictures
        print(f"attention overlays skipped: {type(exc).__name__}: {exc}", flush=True)
        return {}


def render_eval_overlays(model, info, cfg: Config, device) -> dict:
    from datasets.stream import StreamSpec, make_loader
    from trainer.models.backbones import input_resample

    count = cfg.eval.overlays
    spec = StreamSpec(
        shards=info.shards(cfg.eval.split),
        num_labels=info.num_labels,
        image_size=cfg.data.image_size,
        batch_size=count,
        train=False,
        resample=input_resample(cfg.model),
    )
    batch = next((b for b in make_loader(spec, 0) if b.has_samples), None)
    if batch is None:
        return {}
    label_ids = torch.arange(info.num_labels, device=device)
    items = attention_outputs(model, batch.images.to(device), label_ids)
    if items is None:
        return {}
    unseen = set(info.unseen.tolist())
    names = [lab.name + ("*" if lab.index in unseen else "") for lab in info.labels]
    top_k = min(cfg.eval.k)
    files, taken = {}, set()
    for item, key, truth in zip(items, batch.keys, batch.labels.numpy()):
        marks = ["+" if t > 0 else "-" if t < 0 else "?" for t in truth]
        sheet = render_sheet(item, names, key, top_k, marks, np.flatnonzero(truth > 0))  # legend in docs/training.md
        files[f"attention/{file_name(key, taken)}"] = lambda path, sheet=sheet: write_sheet(sheet, path)
    return files
