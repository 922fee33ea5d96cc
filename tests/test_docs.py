"""The docs pages' examples run: every ```python block of every docs/*.md, in order.

Each page's blocks share one namespace (a later block may use what an earlier one defined), and
each page starts from a fresh one. A block is compiled with the page's path as its file name and
its own line numbers in the page, so a traceback points at the line of the .md file that failed.
"""
import ast
import re
import traceback
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"
INDEX = DOCS / "README.md"
PAGES = sorted(p for p in DOCS.glob("*.md") if p.name != INDEX.name)

# The classes of issue 10 and the page that documents each.
CLASS_PAGES = {
    "ExtendedBatchNorm2d": "extended_batch_norm.md",
    "ModalityBatchNorm2d": "modality_batch_norm.md",
    "GhostBatchNorm2d": "ghost_batch_norm.md",
    "BatchRenorm2d": "batch_renorm.md",
    "FrozenBatchNorm2d": "frozen_batch_norm.md",
    "FilterResponseNorm2d": "filter_response_norm.md",
    "EvoNormB0_2d": "evonorm.md",
    "EvoNormS0_2d": "evonorm.md",
    "ProxyNorm2d": "proxy_norm.md",
    "BatchChannelNorm2d": "batch_channel_norm.md",
    "BatchLayerNorm2d": "batch_layer_norm.md",
    "LayerNorm2d": "layer_norm_2d.md",
    "LocalResponseNorm": "local_response_norm.md",
    "MovingAverageBatchNorm2d": "moving_average_batch_norm.md",
    "CrossIterationBatchNorm2d": "cross_iteration_batch_norm.md",
    "BatchKalmanNorm2d": "batch_kalman_norm.md",
}

# What an example may import: the docs promise examples that need nothing but these.
ALLOWED_IMPORTS = {"numpy", "normkit"}
# Pages about an interop layer may import what it interoperates with.
PAGE_IMPORTS = {"torch.md": {"torch"}}

# A fence opens with ```python (optionally more words after it) at the start of a line and
# closes with ``` alone on a line.
_BLOCK = re.compile(r"^```python[^\n]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)


def python_blocks(path):
    """[(first line of the code in the page, 1-based; code)] for every ```python block."""
    text = path.read_text(encoding="utf-8")
    return [(text.count("\n", 0, m.start(1)) + 1, m.group(1)) for m in _BLOCK.finditer(text)]


def _page_id(path):
    return path.stem


def test_docs_folder_has_pages():
    assert DOCS.is_dir(), f"expected a docs folder at {DOCS}"
    assert PAGES, f"expected docs pages (*.md) in {DOCS}"


@pytest.mark.parametrize("page", PAGES, ids=_page_id)
def test_page_has_python_example(page):
    assert python_blocks(page), f"{page.name}: expected at least one ```python block, found none"


@pytest.mark.parametrize("page", PAGES, ids=_page_id)
def test_page_imports_only_numpy_and_normkit(page):
    for i, (line, code) in enumerate(python_blocks(page), 1):
        tree = ast.parse("\n" * (line - 1) + code, filename=str(page))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            allowed = ALLOWED_IMPORTS | PAGE_IMPORTS.get(page.name, set())
            for name in names:
                top = name.split(".")[0]
                assert top in allowed, (
                    f"{page.name} block {i} (line {node.lineno}): imports {name!r}; "
                    f"examples may import only {sorted(allowed)}")


@pytest.mark.parametrize("page", PAGES, ids=_page_id)
def test_page_examples_run(page):
    for module in PAGE_IMPORTS.get(page.name, ()):
        pytest.importorskip(module)  # torch.md's examples need torch (installed in CI)
    namespace = {"__name__": f"docs_{page.stem}"}
    for i, (line, code) in enumerate(python_blocks(page), 1):
        failure = None
        # Leading newlines give the compiled block the page's line numbers.
        try:
            exec(compile("\n" * (line - 1) + code, str(page), "exec"), namespace)
        except Exception as e:  # noqa: BLE001 -- report any failure with where it happened
            tb = "".join(traceback.format_exception(type(e), e, e.__traceback__.tb_next))
            failure = (f"{page.name} block {i} (starting at line {line}) failed: "
                       f"{type(e).__name__}: {e}\n{tb}")
        if failure is not None:  # outside the except: no "during handling" chain in the report
            pytest.fail(failure, pytrace=False)


@pytest.mark.parametrize("cls", sorted(CLASS_PAGES))
def test_every_variant_has_its_page(cls):
    page = DOCS / CLASS_PAGES[cls]
    assert page.is_file(), f"{cls}: expected its docs page at docs/{CLASS_PAGES[cls]}"
    assert cls in page.read_text(encoding="utf-8"), f"docs/{page.name}: never names {cls}"
    assert any(cls in code for _, code in python_blocks(page)), (
        f"docs/{page.name}: no ```python example uses {cls}")


def test_index_lists_every_page():
    assert INDEX.is_file(), f"expected an index at docs/{INDEX.name}"
    index = INDEX.read_text(encoding="utf-8")
    missing = [p.name for p in PAGES if f"({p.name})" not in index]
    assert not missing, f"docs/{INDEX.name} does not link {missing}"
