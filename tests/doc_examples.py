"""The docs pages' ```python examples, extracted once for the test suite and for CI's type check.

`python_blocks(page)` gives a page's blocks with the line each starts at; `write_modules(dir)`
writes each page's blocks, in order, into one module per page (`<stem>.py`, every block at its own
line of the page, so mypy's line numbers are the .md file's), which `.ci/docs.sh` type-checks with
`mypy --strict`. Run as a script: `python tests/doc_examples.py OUT_DIR` writes them and prints
their paths.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"

# A fence opens with ```python (optionally more words after it) at the start of a line and
# closes with ``` alone on a line.
_BLOCK = re.compile(r"^```python[^\n]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)


def markdown_pages(docs: Path = DOCS) -> list[Path]:
    """Every .md file under docs/, subfolders included, sorted."""
    return sorted(docs.rglob("*.md"))


def python_blocks(path: Path) -> list[tuple[int, str]]:
    """[(first line of the code in the page, 1-based; code)] for every ```python block."""
    text = path.read_text(encoding="utf-8")
    return [(text.count("\n", 0, m.start(1)) + 1, m.group(1)) for m in _BLOCK.finditer(text)]


def page_source(path: Path) -> str:
    """The page's blocks as one module, each block at its own lines of the page (blank lines
    elsewhere): what the test suite runs, block by block, in one namespace."""
    lines: list[str] = []
    for line, code in python_blocks(path):
        lines.extend([""] * (line - 1 - len(lines)))
        lines.extend(code.splitlines())
    return "\n".join(lines) + "\n"


def write_modules(out: Path, docs: Path = DOCS) -> list[Path]:
    """One module per page with examples, named after the page (api/x.md -> api_x.py)."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for page in markdown_pages(docs):
        if not python_blocks(page):
            continue
        name = "_".join(page.relative_to(docs).with_suffix("").parts)
        target = out / f"docs_{name}.py"
        target.write_text(page_source(page), encoding="utf-8")
        written.append(target)
    return written


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python tests/doc_examples.py OUT_DIR")
    for p in write_modules(Path(sys.argv[1])):
        print(p)
