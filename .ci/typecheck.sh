#!/usr/bin/env bash
# The typed API: mypy --strict over python/normkit (pyproject.toml's [tool.mypy]) and stubtest of
# the extension's checked-in stub (python/normkit/_core.pyi) against the compiled module normkit
# is installed with. Needs normkit installed in the active environment.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q $(python .ci/extra_requirements.py typecheck)
python -m mypy
allow=()
[ -f .ci/stubtest-allowlist.txt ] && allow=(--allowlist .ci/stubtest-allowlist.txt)
python -m mypy.stubtest normkit._core --mypy-config-file pyproject.toml "${allow[@]}"
