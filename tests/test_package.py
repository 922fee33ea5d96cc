"""What the installed distribution carries: one version everywhere, complete metadata, the type
information (py.typed and the extension's stub) next to the code it describes.

These run against whatever normkit is installed; CI runs the suite against the editable build,
the repaired wheel and the sdist (.ci/wheel.sh)."""
import importlib.metadata as md
from pathlib import Path

import normkit

PACKAGE = Path(normkit.__file__).resolve().parent


def test_the_installed_version_is_the_one_in_normkit_init():
    assert md.version("normkit") == normkit.__version__


def test_metadata_names_license_python_versions_and_urls():
    meta = md.metadata("normkit")
    assert meta["License-Expression"] == "BSD-3-Clause"
    assert meta["Requires-Python"] == ">=3.10"
    classifiers = meta.get_all("Classifier")
    for minor in (10, 11, 12, 13):
        assert f"Programming Language :: Python :: 3.{minor}" in classifiers
    assert "Typing :: Typed" in classifiers
    urls = dict(u.split(", ", 1) for u in meta.get_all("Project-URL"))
    assert {"Homepage", "Documentation", "Source", "Issues", "Changelog"} <= set(urls)
    assert set(meta.get_all("Provides-Extra")) >= {"test", "demo", "mpi", "torch", "docs", "typecheck"}


def test_the_package_is_typed_and_ships_the_extension_stub():
    assert (PACKAGE / "py.typed").is_file()
    stub = PACKAGE / "_core.pyi"
    assert stub.is_file()
    # Every public name of the extension is in its stub (stubtest checks the signatures in CI).
    text = stub.read_text(encoding="utf-8")
    public = [n for n in dir(normkit._core) if not n.startswith("_")]
    missing = [n for n in public if f"def {n}(" not in text and f"class {n}" not in text and f"{n}:" not in text]
    assert not missing, f"_core.pyi lacks {missing}"


def test_the_console_script_is_declared():
    eps = md.entry_points(group="console_scripts")
    assert any(ep.name == "normkit" and ep.value == "normkit.__main__:main" for ep in eps)
