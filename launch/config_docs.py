"""Write docs/configuration.md from trainer/config.py: `python -m launch.config_docs > docs/configuration.md`.

The dataclasses give every section, key, type and default; the comments beside the fields give the
meanings, read from the module's source with `tokenize` (comments are not in the AST). Which field a
comment belongs to:
- a comment at the end of a field's line belongs to that field;
- a block of comment lines right above a field without such a comment leads that field;
- a block right below a field (no blank line between) continues that field's comment;
- any other block right above a field leads it; a block that touches no field is a note on the section.
A class docstring describes its section. tests/test_docs.py fails when the committed page differs.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import json
import sys
import tokenize
from pathlib import Path

from trainer import config as config_module

COMMAND = "python -m launch.config_docs > docs/configuration.md"

INTRO = """\
An experiment is one YAML file with the sections below (`launch/synthetic.yaml` is the demo's,
`launch/openimages.yaml` and `launch/nuswide.yaml` the paper's runs). The whole config is validated
before any cluster work: an unknown key, a wrong type or a bad value is an error that names the
dotted key (exit code 2). Any key can be overridden on the command line, the value read as YAML:

```bash
lesa train launch/synthetic.yaml --out runs/x --set train.max_steps=1000 --set eval.k=[10,20]
```

What the keys do in a run (validation, the learning-rate schedule, checkpoints, MLflow) is in
[training.md](training.md); the models and backbones `model.*` names are described there too.
"""


def _comments(source: str) -> dict[int, tuple[str, bool]]:
    """Line number -> (comment text, whether the comment is alone on its line)."""
    out: dict[int, tuple[str, bool]] = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            alone = not tok.line[: tok.start[1]].strip()
            out[tok.start[0]] = (tok.string.lstrip("#").strip(), alone)
    return out


def _blocks(lines: list[int]) -> list[list[int]]:
    """Group consecutive line numbers."""
    blocks: list[list[int]] = []
    for n in lines:
        if blocks and blocks[-1][-1] == n - 1:
            blocks[-1].append(n)
        else:
            blocks.append([n])
    return blocks


def _class_comments(node: ast.ClassDef, comments: dict[int, tuple[str, bool]]) -> tuple[dict[str, str], list[str]]:
    """Field name -> its comment, and the section's notes, following the rules of the module docstring."""
    fields = {
        s.lineno: s.target.id for s in node.body if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)
    }
    field_ends = {s.end_lineno: s.lineno for s in node.body if isinstance(s, ast.AnnAssign)}
    parts: dict[str, list[str]] = {name: [] for name in fields.values()}
    trailing = {n: comments[n][0] for n in fields if n in comments and not comments[n][1]}
    for line, text in trailing.items():
        parts[fields[line]].append(text)
    alone = [n for n, (_, is_alone) in comments.items() if is_alone and node.lineno < n <= node.end_lineno]
    notes: list[str] = []
    for block in _blocks(sorted(alone)):
        text = " ".join(comments[n][0] for n in block)
        below, above = block[-1] + 1, block[0] - 1
        if below in fields and below not in trailing:
            parts[fields[below]].insert(0, text)
        elif above in field_ends:
            parts[fields[field_ends[above]]].append(text)
        elif below in fields:
            parts[fields[below]].insert(0, text)
        else:
            notes.append(text)
    return {name: " ".join(p) for name, p in parts.items()}, notes


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return "(required)"
    if value == "":
        return '`""`'
    if isinstance(value, str):
        return f"`{value}`"
    return f"`{json.dumps(value)}`"


def _cell(text: str) -> str:
    """A table cell: a pipe, even inside a code span, would end the cell."""
    return text.replace("|", "\\|") or " "


def config_markdown() -> str:
    """The markdown of docs/configuration.md for the trainer/config.py of this checkout."""
    path = Path(inspect.getsourcefile(config_module))
    source = path.read_text()
    tree = ast.parse(source)
    comments = _comments(source)
    classes = {n.name: n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)}
    out = [
        "# Configuration",
        "",
        f"<!-- Generated from trainer/config.py by `{COMMAND}`; do not edit by hand. -->",
        "",
        INTRO,
    ]
    for section in dataclasses.fields(config_module.Config):
        cls = section.default_factory
        node = classes[cls.__name__]
        meanings, notes = _class_comments(node, comments)
        out += [f"## `{section.name}`", ""]
        doc = ast.get_docstring(node)
        out += [p for p in (doc, *notes) if p]
        if doc or notes:
            out.append("")
        out += ["| key | type | default | meaning |", "|---|---|---|---|"]
        for f in dataclasses.fields(cls):
            kind = f.type if isinstance(f.type, str) else f.type.__name__
            row = [f"`{section.name}.{f.name}`", f"`{kind}`", _default(f), meanings.get(f.name, "")]
            out.append("| " + " | ".join(_cell(c) for c in row) + " |")
        out.append("")
    return "\n".join(out)


def main() -> int:
    sys.stdout.write(config_markdown())
    return 0


if __name__ == "__main__":
    sys.exit(main())
