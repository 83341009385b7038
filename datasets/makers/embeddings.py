"""Label embeddings: turn label names into word vectors, as LESA's label vectors.

Sources of label vectors, all behind `load_label_encoder(spec, names=None)`:
- a GloVe / word2vec **text** file (`token v1 ... vd` per line; a word2vec `count dim` header line
  is skipped), any fsspec path or URL, compressed (.gz/.bz2/.xz) or not;
- a `.npy` matrix plus a names file (one name per line, rows aligned), e.g. the NUS-WIDE GloVe rows;
- `wordllama`: an optional sentence encoder whose weights ship inside its wheel (extra `wordllama`);
- `clip-text:PATH`: CLIP's text tower from a checkpoint folder, each name through a prompt ensemble
  (datasets/makers/clip_text.py, optional extra `clip`).
Several sources can be chained (`load_label_encoders`): a word takes the first source's vector.

For word vectors a label name is lowercased. If the whole name (or its `_`-joined form, word2vec's
phrase style) is in the vocabulary, its vector is used; otherwise the name is split on spaces, `_`,
`-` and `/`, the tokens lose surrounding punctuation, and the vector is the mean of the
in-vocabulary tokens' vectors ("Isle of man tt" = mean of isle, of, man, tt). A name with no
token in the vocabulary is reported as missing. Vectors are raw (the model normalises).

A text file is streamed once per `encode` call and only the tokens that call needs are kept, so a
multi-GB GloVe file costs memory for the asked-for tokens only. Vocabulary keys are lowercased;
when two entries lowercase to the same key the first wins (word2vec files list frequent words first).
"""

from __future__ import annotations

import hashlib
import io
import re

import fsspec
import numpy as np

from datasets.contract import DatasetError, check_label_vectors, read_npy

MISSING_POLICIES = ("error", "random")  # no "zero": a zero label vector scores 0 on every image and is refused
_SPLIT = re.compile(r"[\s_\-/]+")
_PUNCT = "()[]{}<>,.;:!?\"'`*"


def name_keys(name: str) -> tuple[list[str], list[str]]:
    """(whole-name keys tried first, tokens averaged otherwise) for one label name."""
    low = " ".join(name.lower().split())
    whole = [low, low.replace(" ", "_")]
    tokens = [t.strip(_PUNCT) for t in _SPLIT.split(low)]
    return whole, [t for t in tokens if t]


class WordVectors:
    """Base: a word -> vector lookup; subclasses implement `lookup(keys)` and `dim`."""

    dim: int
    source: str

    def lookup(self, keys: set[str]) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def encode(self, names: list[str]) -> tuple[np.ndarray, list[str]]:
        """Vectors float32 [len(names), dim] (zero rows for missing names) and the missing names."""
        vectors, missing_rows = self.encode_rows(names)
        return vectors, [names[i] for i in missing_rows]

    def encode_rows(self, names: list[str]) -> tuple[np.ndarray, list[int]]:
        """As `encode`, but the missing names are given by position."""
        parsed = [name_keys(n) for n in names]
        wanted = {k for whole, tokens in parsed for k in (*whole, *tokens)}
        found = self.lookup(wanted)
        out = np.zeros((len(names), self.dim), dtype=np.float32)
        missing = []
        for i, (whole, tokens) in enumerate(parsed):
            hit = next((found[k] for k in whole if k in found), None)
            if hit is None:
                vecs = [found[t] for t in tokens if t in found]
                hit = np.mean(vecs, axis=0) if vecs else None
            if hit is None:
                missing.append(i)
            else:
                out[i] = hit
        return out, missing


class TextWordVectors(WordVectors):
    """A GloVe or word2vec text file, streamed; nothing but the asked-for tokens is kept."""

    def __init__(self, url: str):
        self.source = url
        self.dim = self._read_dim()

    def _lines(self):
        try:
            with fsspec.open(self.source, "rt", encoding="utf-8", errors="replace", compression="infer") as f:
                yield from f
        except FileNotFoundError:
            raise DatasetError(f"{self.source}: word-vector file not found") from None

    def _read_dim(self) -> int:
        if self.source.endswith(".bin"):
            raise DatasetError(f"{self.source}: binary word2vec files are not supported, convert them to text")
        lines = self._lines()
        try:
            return self._dim_from(lines)
        finally:
            lines.close()

    def _dim_from(self, lines) -> int:
        for lineno, line in enumerate(lines, start=1):
            parts = line.split()
            if lineno == 1 and len(parts) == 2 and all(p.isdigit() for p in parts):
                return int(parts[1])  # word2vec text header: `count dim`
            if len(parts) < 2:
                continue
            try:
                float(parts[-1])
            except ValueError:
                break
            # A GloVe token may hold spaces (840B), so count the numeric fields from the right.
            dim = 0
            for p in reversed(parts):
                try:
                    float(p)
                except ValueError:
                    break
                dim += 1
            return dim - 1 if dim == len(parts) else dim
        raise DatasetError(
            f"{self.source}: not a word-vector text file (expected 'token v1 ... vd' lines; "
            f"binary word2vec files are not supported, convert them to text)"
        )

    def lookup(self, keys: set[str]) -> dict[str, np.ndarray]:
        found: dict[str, np.ndarray] = {}
        firsts = {k.split(" ", 1)[0] for k in keys}
        for line in self._lines():
            # Cheap test on the first field before parsing `dim` floats; most lines end here.
            if line.split(" ", 1)[0].lower() not in firsts:
                continue
            parts = line.rstrip("\r\n").rsplit(" ", self.dim)
            if len(parts) != self.dim + 1:
                continue  # the header line, or a malformed line: not a vector of this file's size
            token = parts[0].lower()
            if token in keys and token not in found:
                try:
                    found[token] = np.asarray(parts[1:], dtype=np.float32)
                except ValueError:
                    continue
        return found


class NpyWordVectors(WordVectors):
    """A `.npy` matrix (rows) plus a names file (one name per line, aligned with the rows)."""

    def __init__(self, npy_url: str, names_url: str):
        self.source = f"{npy_url} + {names_url}"
        matrix = read_npy(npy_url)
        if matrix.ndim != 2:
            raise DatasetError(f"{npy_url}: shape {matrix.shape}, expected [names, dim]")
        try:
            with fsspec.open(names_url, "rt", encoding="utf-8") as f:
                names = [line.strip() for line in f.read().splitlines()]
        except FileNotFoundError:
            raise DatasetError(f"{names_url}: names file not found") from None
        while names and not names[-1]:
            names.pop()
        if len(names) != matrix.shape[0]:
            raise DatasetError(f"{names_url}: {len(names)} names but {npy_url} has {matrix.shape[0]} rows")
        self.matrix = matrix.astype(np.float32, copy=False)
        self.dim = int(matrix.shape[1])
        self.index: dict[str, int] = {}
        for row, name in enumerate(names):
            self.index.setdefault(" ".join(name.lower().split()), row)

    def lookup(self, keys: set[str]) -> dict[str, np.ndarray]:
        return {k: self.matrix[self.index[k]] for k in keys if k in self.index}


class WordLlamaVectors(WordVectors):
    """WordLlama's `l2_supercat` sentence encoder (256-d), optional extra `wordllama`.

    Its weights and tokenizer ship inside the PyPI wheel; nothing is downloaded. A whole label
    name is embedded at once, as written (no lowercasing, no token averaging), so every name gets
    a vector. Not what LESA used (GloVe): a fallback for vocabularies that word vectors cover badly.
    """

    def __init__(self):
        self.source, self.dim = "wordllama (l2_supercat, bundled weights)", 256
        try:
            import wordllama
            from wordllama import WordLlama
        except ImportError:
            raise DatasetError(
                "--vectors wordllama needs the optional extra: pip install -c constraints.txt -e '.[wordllama]'"
            ) from None
        from pathlib import Path

        # 0.4.0 looks for its bundled tokenizer under `<cache_dir>/tokenizers/`, where the wheel
        # has it, but not under the package folder it searches first: point the cache there.
        try:
            self.model = WordLlama.load(
                config="l2_supercat", dim=256, disable_download=True, cache_dir=Path(wordllama.__file__).parent
            )
        except FileNotFoundError as exc:
            raise DatasetError(f"wordllama: bundled weights not found ({exc})") from None

    def lookup(self, keys: set[str]) -> dict[str, np.ndarray]:
        keys = sorted(keys)
        return dict(zip(keys, self.model.embed(keys, norm=False).astype(np.float32))) if keys else {}

    def encode_rows(self, names: list[str]) -> tuple[np.ndarray, list[int]]:
        if not names:
            return np.zeros((0, self.dim), np.float32), []
        # Case kept: the tokenizer is cased and proper names embed better as written
        # (measured: "Boeing 767" nearest "Airbus A320" cased, not lowercased).
        text = [" ".join(n.split()) for n in names]
        return self.model.embed(text, norm=False).astype(np.float32), []


class ChainedWordVectors(WordVectors):
    """Several sources in order; a key takes its vector from the first source that has it
    (e.g. NUS-WIDE's tag vectors, then its concept vectors for the six concepts that are no tag)."""

    def __init__(self, sources: list[WordVectors]):
        dims = {s.dim for s in sources}
        if len(dims) != 1:
            raise DatasetError(
                "word-vector sources differ in dimension: " + ", ".join(f"{s.source} ({s.dim})" for s in sources)
            )
        self.sources, self.dim = sources, dims.pop()
        self.source = " + ".join(s.source for s in sources)

    def lookup(self, keys: set[str]) -> dict[str, np.ndarray]:
        found: dict[str, np.ndarray] = {}
        for source in self.sources:
            found.update(source.lookup(keys - found.keys()))
        return found


def load_label_encoders(specs: list[str], names: list[str] | None = None) -> WordVectors:
    """One encoder over several sources; each `.npy` spec takes the next names file, in order."""
    names = list(names or [])
    if sum(s.endswith(".npy") for s in specs) != len(names):
        raise DatasetError(
            f"{sum(s.endswith('.npy') for s in specs)} .npy vector files need as many names files, got {len(names)}"
        )
    encoders = [load_label_encoder(s, names.pop(0) if s.endswith(".npy") else None) for s in specs]
    return encoders[0] if len(encoders) == 1 else ChainedWordVectors(encoders)


def load_label_encoder(spec: str, names: str | None = None, templates: str | None = None) -> WordVectors:
    """`spec` is a word-vector text file, a `.npy` matrix whose row names are in `names`,
    `wordllama` (the optional bundled sentence encoder) or `clip-text:PATH` (`templates`: a file of
    prompt templates in place of its default set)."""
    if spec == "wordllama":
        return WordLlamaVectors()
    if spec.startswith("clip-text:"):
        from datasets.makers.clip_text import DEFAULT_TEMPLATES, ClipTextVectors, read_templates

        return ClipTextVectors(
            spec.removeprefix("clip-text:"), read_templates(templates) if templates else DEFAULT_TEMPLATES
        )
    if templates is not None:
        raise DatasetError(f"{templates}: prompt templates go with a clip-text:PATH encoder, not with {spec}")
    if spec.endswith(".npy"):
        if names is None:
            raise DatasetError(f"{spec}: a .npy vector matrix needs a names file (one name per row)")
        return NpyWordVectors(spec, names)
    if names is not None:
        raise DatasetError(f"{names}: a names file goes with a .npy matrix, not with the text file {spec}")
    return TextWordVectors(spec)


def _random_vector(name: str, dim: int, scale: float) -> np.ndarray:
    # Seeded by the name, so a label gets the same vector in every run and on every machine.
    seed = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")
    v = np.random.default_rng(seed).standard_normal(dim)
    return (v / np.linalg.norm(v) * scale).astype(np.float32)


def embed_labels(encoder: WordVectors, names: list[str], missing: str = "error", log=print) -> np.ndarray:
    """Vectors for `names`; a missing name is an error or a random row (by `missing`).

    "random" gives a unit direction scaled to the mean norm of the found vectors, deterministic in
    the name. There is no zero row: a zero label vector scores 0 on every image, and read_dataset
    refuses it (datasets/contract.py, check_label_vectors).
    """
    if missing not in MISSING_POLICIES:
        raise ValueError(f"missing must be one of {MISSING_POLICIES}, got {missing!r}")
    vectors, absent = encoder.encode_rows(names)
    if absent:
        shown = ", ".join(repr(names[i]) for i in absent[:20]) + (" ..." if len(absent) > 20 else "")
        if missing == "error":
            raise DatasetError(
                f"{encoder.source}: {len(absent)} of {len(names)} labels have no word in "
                f"the vocabulary: {shown} (use --missing random to give them random vectors)"
            )
        found = np.ones(len(names), dtype=bool)
        found[absent] = False
        scale = float(np.linalg.norm(vectors[found], axis=1).mean()) if found.any() else 1.0
        for i in absent:
            vectors[i] = _random_vector(names[i], encoder.dim, scale)
        log(
            f"embeddings: {len(absent)} of {len(names)} labels not in {encoder.source}, "
            f"given {missing} vectors: {shown}"
        )
    return vectors


def label_vectors(
    names: list[str], vectors, vector_names, embeddings: str | None, missing: str, log=print
) -> np.ndarray:
    """Label vectors from a precomputed `.npy` aligned with labels.tsv, or from word vectors
    (`vectors`: one source or a list, first source with a word wins; see datasets/makers/embeddings.py).
    Checked before any shard is written: a NaN, Inf or all-zero vector is an error naming its label."""
    if (not vectors) == (embeddings is None):
        raise DatasetError(
            "give exactly one of --vectors (word vectors) or --embeddings (a precomputed "
            ".npy aligned with the seen + unseen label order)"
        )
    if embeddings is not None:
        matrix = read_npy(embeddings)
        if matrix.ndim != 2 or matrix.shape[0] != len(names):
            raise DatasetError(
                f"{embeddings}: shape {matrix.shape}, expected [{len(names)}, dim] (seen labels, then unseen)"
            )
        check_label_vectors(matrix, names, embeddings, f"give these labels finite, non-zero rows in {embeddings}")
        return matrix.astype(np.float32)
    as_list = lambda x: [x] if isinstance(x, str) else list(x or [])  # noqa: E731
    encoder = load_label_encoders(as_list(vectors), as_list(vector_names))
    out = embed_labels(encoder, names, missing=missing, log=log)
    check_label_vectors(out, names, encoder.source, "check these words' vectors")
    return out


def write_label_vectors(
    names_url: str, spec: str, out: str, templates: str | None = None, missing: str = "error", log=print
) -> tuple[str, str]:
    """`lesa embed-labels`: the names in `names_url` (one per line) embedded by the encoder `spec`,
    written as `out` (.npy, float32 [names, dim]) and its names file beside it (.txt, one name per
    line): the pair `--vectors X.npy --vector-names X.txt` and `--label-vectors` read."""
    if not out.endswith(".npy"):
        raise DatasetError(f"--out {out}: must end in .npy (the names go beside it, in .txt)")
    try:
        with fsspec.open(names_url, "rt", encoding="utf-8") as f:
            names = [" ".join(line.split()) for line in f.read().splitlines()]
    except FileNotFoundError:
        raise DatasetError(f"{names_url}: names file not found") from None
    names = [n for n in names if n]
    if not names:
        raise DatasetError(f"{names_url}: no names (one label name per line)")
    vectors = embed_labels(load_label_encoder(spec, templates=templates), names, missing=missing, log=log)
    names_out = out[: -len(".npy")] + ".txt"
    buffer = io.BytesIO()
    np.save(buffer, vectors, allow_pickle=False)
    with fsspec.open(out, "wb") as f:
        f.write(buffer.getvalue())
    with fsspec.open(names_out, "w", encoding="utf-8") as f:
        f.write("".join(f"{n}\n" for n in names))
    log(f"embed-labels: {len(names)} names, {vectors.shape[1]}-d, -> {out} + {names_out}")
    return out, names_out
