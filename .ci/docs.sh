#!/usr/bin/env bash
# The documentation site, built strict (any warning fails: broken links, pages missing from the
# nav, docstrings that do not render), and the docs' examples type-checked with mypy --strict
# (tests/test_docs.py runs them). Needs normkit installed in the active environment.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q $(python .ci/extra_requirements.py docs) $(python .ci/extra_requirements.py typecheck)
work=$(mktemp -d)
NO_MKDOCS_2_WARNING=1 python -m mkdocs build --strict --quiet -d "$work/site"
test -s "$work/site/index.html" && test -s "$work/site/api/layers/index.html"
python tests/doc_examples.py "$work/examples" >/dev/null
python -m mypy --strict --config-file pyproject.toml "$work"/examples/*.py
