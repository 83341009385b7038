"""The documentation stays true to the checkout: the generated config page is current, every relative
link resolves, and nothing points at files a clone does not have."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from launch.config_docs import COMMAND, config_markdown

ROOT = Path(__file__).resolve().parents[1]
# Background files of the project's authors, outside the repository. Spelled in pieces so that this
# file does not match itself.
OUTSIDE = ["DESIGN" + ".md", "lesa" + "_spec", "stack" + "_notes", ".." + "/shared"]
CHECKED = (".py", ".md", ".yaml", ".toml", ".sh", ".txt")
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")


def tracked_files() -> list[Path]:
    out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    return [ROOT / name for name in out.decode().split("\0") if name]


def markdown_pages() -> list[Path]:
    return [ROOT / "README.md", ROOT / "cluster" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lowercase, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return {slug(m.group(1)) for m in re.finditer(r"^#+\s+(.+)$", text, flags=re.M)}


def test_configuration_page_is_current():
    page = ROOT / "docs" / "configuration.md"
    assert page.exists(), f"docs/configuration.md is missing: run `.venv/bin/{COMMAND}`"
    assert page.read_text() == config_markdown(), (
        f"docs/configuration.md is out of date with trainer/config.py: run `.venv/bin/{COMMAND}`"
    )


def test_configuration_page_lists_every_key():
    from trainer.config import Config

    text = (ROOT / "docs" / "configuration.md").read_text()
    missing = [key for key in Config().flat() if f"| `{key}` |" not in text]
    assert not missing, f"keys of trainer/config.py without a row in docs/configuration.md: {missing}"


def test_nothing_points_outside_the_repository():
    offenders = []
    for path in tracked_files():
        if not (path.suffix in CHECKED or path.name == "Makefile") or not path.is_file():
            continue
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if any(word in line for word in OUTSIDE):
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offenders, "pointers to files outside the repository (cite docs/*.md instead):\n" + "\n".join(offenders)


def test_relative_links_resolve():
    broken = []
    for page in markdown_pages():
        for target in LINK.findall(page.read_text()):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                continue
            file_part, _, anchor = target.partition("#")
            dest = (page.parent / file_part).resolve() if file_part else page
            if not dest.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_readme_is_a_front_door():
    readme = ROOT / "README.md"
    size = len(readme.read_bytes())
    assert size < 16_000, f"README.md is {size} bytes: move detail to docs/ (limit 16,000)"
    assert "make test" in readme.read_text(), "README.md must keep `make test`, the command CI runs"


def test_cited_repository_files_exist():
    """A file of the repository named in the docs (`trainer/x.py`, `tests/test_y.py`, …) exists, so a
    move or rename that forgets the docs fails here."""
    cited = re.compile(
        r"(?<![\w/.])((?:trainer|datasets|launch|tests|benchmarks|cluster|docs)/[\w./-]+\.(?:py|md|yaml|sh|c))\b"
    )
    missing = []
    for page in markdown_pages():
        for path in sorted(set(cited.findall(page.read_text()))):
            if not (ROOT / path).exists():
                missing.append(f"{page.relative_to(ROOT)}: {path}")
    assert not missing, "files named in the docs that the repository lacks:\n" + "\n".join(missing)
