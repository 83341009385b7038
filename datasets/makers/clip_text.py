"""Label vectors from CLIP's text tower: the label encoder `clip-text:PATH` (PATH a CLIP checkpoint
folder, datasets/makers/clip_folder.py), beside GloVe and wordllama (datasets/makers/embeddings.py).

Each name is embedded through a prompt ensemble: every template (`{}` stands for the name) is
filled in, embedded with the text tower and projected into the joint image-text space
(`get_text_features`), each embedding is L2-normalised, the template embeddings are averaged, and
the mean is normalised again. The names are used as written (CLIP's tokenizer lowercases), so every
name gets a vector. DEFAULT_TEMPLATES is a short set in the style of CLIP's ImageNet prompts;
`--prompt-templates FILE` (one template per line) replaces it.
"""

from __future__ import annotations

import fsspec
import numpy as np

from datasets.contract import DatasetError
from datasets.makers.clip_folder import load_clip_model, load_clip_tokenizer
from datasets.makers.embeddings import WordVectors

CLIP_TEXT = "clip-text:"  # the spec prefix: clip-text:PATH
DEFAULT_TEMPLATES = (
    "a photo of a {}.",
    "a photo of the {}.",
    "a close-up photo of a {}.",
    "a photo of a small {}.",
    "a photo of a large {}.",
    "a bright photo of a {}.",
    "a dark photo of a {}.",
    "a blurry photo of a {}.",
    "a cropped photo of a {}.",
    "art of a {}.",
    "a picture of {}.",
    "{}",
)
BATCH = 256  # prompts per forward pass


def read_templates(url: str) -> tuple[str, ...]:
    """One template per line, each with exactly one `{}`; blank lines are skipped."""
    try:
        with fsspec.open(url, "rt", encoding="utf-8") as f:
            lines = [line.strip() for line in f.read().splitlines()]
    except FileNotFoundError:
        raise DatasetError(f"{url}: prompt-template file not found") from None
    templates = tuple(line for line in lines if line)
    bad = [t for t in templates if t.count("{}") != 1]
    if not templates or bad:
        raise DatasetError(
            f"{url}: each line must be one template with exactly one {{}} for the name"
            + (f" (not: {bad[0]!r})" if bad else " (the file is empty)")
        )
    return templates


class ClipTextVectors(WordVectors):
    """`clip-text:PATH`: whole names through CLIP's text tower (encode_rows), not word lookups."""

    def __init__(self, url: str, templates: tuple[str, ...] = DEFAULT_TEMPLATES):
        if not url:
            raise DatasetError(f"{CLIP_TEXT}PATH: give the CLIP checkpoint folder after the colon")
        import torch

        self.source = f"{CLIP_TEXT}{url} ({len(templates)} prompt templates)"
        self.templates = templates
        model, folder = load_clip_model(url)
        self.tokenizer = load_clip_tokenizer(folder, url)
        self.model = model.eval()
        self.dim = int(model.config.projection_dim)
        self.max_length = int(model.config.text_config.max_position_embeddings)
        self._torch = torch

    def prompt_features(self, prompts: list[str]) -> np.ndarray:
        """Unit rows [len(prompts), dim]: each prompt's projected, L2-normalised text embedding."""
        torch, rows = self._torch, []
        with torch.no_grad():
            for start in range(0, len(prompts), BATCH):
                tokens = self.tokenizer(
                    prompts[start : start + BATCH],
                    padding=True,
                    truncation=True,
                    max_length=self.max_length,
                    return_tensors="pt",
                )
                out = self.model.get_text_features(
                    input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]
                )
                rows.append(torch.nn.functional.normalize(out.pooler_output.float(), dim=1))
        return torch.cat(rows).numpy() if rows else np.zeros((0, self.dim), np.float32)

    def encode_rows(self, names: list[str]) -> tuple[np.ndarray, list[int]]:
        if not names:
            return np.zeros((0, self.dim), np.float32), []
        names = [" ".join(n.split()) for n in names]
        prompts = [t.format(n) for n in names for t in self.templates]
        per_name = self.prompt_features(prompts).reshape(len(names), len(self.templates), self.dim)
        mean = per_name.mean(axis=1)
        return (mean / np.linalg.norm(mean, axis=1, keepdims=True)).astype(np.float32), []
