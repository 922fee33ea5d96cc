"""The docs pages' examples run: every ```python block of every docs/*.md, in order.

Each page's blocks share one namespace (a later block may use what an earlier one defined), and
each page starts from a fresh one. A block is compiled with the page's path as its file name and
its own line numbers in the page, so a traceback points at the line of the .md file that failed.
"""
import ast
import re
import traceback

import pytest

import normkit
from doc_examples import DOCS, ROOT, markdown_pages, python_blocks

INDEX = DOCS / "README.md"
PAGES = sorted(p for p in DOCS.glob("*.md") if p.name != INDEX.name)
MKDOCS = ROOT / "mkdocs.yml"
# Pages that are reference tables, not tutorials: no example of their own.
PAGES_WITHOUT_EXAMPLES = {"benchmarks.md"}

# Every layer and the page that documents it: what it fixes, the equations, defaults, when to use
# it, and an example that uses it.
CLASS_PAGES = {
    "BatchNorm1d": "batch_norm.md",
    "BatchNorm2d": "batch_norm.md",
    "BatchNorm3d": "batch_norm.md",
    "LayerNorm": "layer_norm.md",
    "GroupNorm": "group_norm.md",
    "InstanceNorm1d": "instance_norm.md",
    "InstanceNorm2d": "instance_norm.md",
    "InstanceNorm3d": "instance_norm.md",
    "RMSNorm": "rms_norm.md",
    "SyncBatchNorm": "sync_batchnorm.md",
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
PAGE_IMPORTS = {"torch.md": {"torch"}, "getting_started.md": {"torch"},
                "numerics.md": {"ml_dtypes"}}


def _page_id(path):
    return path.stem


def test_docs_folder_has_pages():
    assert DOCS.is_dir(), f"expected a docs folder at {DOCS}"
    assert PAGES, f"expected docs pages (*.md) in {DOCS}"


@pytest.mark.parametrize("page", [p for p in PAGES if p.name not in PAGES_WITHOUT_EXAMPLES],
                         ids=_page_id)
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
def test_every_layer_has_its_page(cls):
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


def test_every_public_layer_class_is_mapped_to_a_page():
    layers = [n for n in normkit.__all__
              if isinstance(getattr(normkit, n), type) and issubclass(getattr(normkit, n), normkit.NormLayer)
              and n != "NormLayer"]
    unmapped = sorted(set(layers) - set(CLASS_PAGES))
    assert not unmapped, f"layers without a docs page in CLASS_PAGES: {unmapped}"


def _nav_pages():
    """The .md files mkdocs.yml's nav names (entries like `- Title: page.md`)."""
    text = MKDOCS.read_text(encoding="utf-8")
    nav = text[text.index("\nnav:"):]
    return re.findall(r"^\s*-\s[^\n:]*:\s*(\S+\.md)\s*$", nav, flags=re.MULTILINE)


def test_the_site_nav_names_every_page_once_and_only_pages_that_exist():
    nav = _nav_pages()
    pages = sorted(p.relative_to(DOCS).as_posix() for p in markdown_pages())
    assert sorted(set(nav)) == sorted(nav), f"mkdocs.yml nav names a page twice: {nav}"
    assert sorted(nav) == pages, (
        f"not in the nav: {sorted(set(pages) - set(nav))}; "
        f"in the nav but not in docs/: {sorted(set(nav) - set(pages))}")


def test_the_api_reference_covers_every_public_name():
    reference = "\n".join(p.read_text(encoding="utf-8") for p in (DOCS / "api").glob("*.md"))
    documented = set(re.findall(r"^:::\s*normkit\.(\w+)\s*$", reference, flags=re.MULTILINE))
    documented |= set(re.findall(r"^\s+- (\w+)\s*$", reference, flags=re.MULTILINE))
    missing = sorted(n for n in normkit.__all__
                     if n not in documented and not n.startswith("_") and n != "__version__")
    assert not missing, f"public names missing from docs/api/*.md: {missing}"
