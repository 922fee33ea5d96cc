#!/usr/bin/env bash
# Build the extension with AddressSanitizer + UndefinedBehaviorSanitizer and run the test suite
# (minus @pytest.mark.slow) against it. Fails on a test failure or on any sanitizer report.
#
#   .ci/sanitize.sh                 build into build/asan, stage, run pytest
#   .ci/sanitize.sh build           build and stage only; prints the staging dir (used by fuzz.sh)
#   .ci/sanitize.sh -- ARGS...      extra pytest arguments, e.g. -- tests/test_threads.py -x
#
# Environment: PYTHON (default: python3), NORMKIT_ASAN_BUILD (default: <repo>/build/asan),
# NORMKIT_SANITIZE_NO_INSTALL=1 to never pip-install missing build tools.
#
# The interpreter is not instrumented, so the sanitizer runtimes are LD_PRELOADed (they must be the
# ones of the compiler that built the extension). detect_leaks=0: CPython leaks by design at exit.
# Reports go to log files (one per process, subprocesses included) that are checked at the end,
# so a report in a child process that a test tolerates still fails the run.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
BUILD="${NORMKIT_ASAN_BUILD:-$ROOT/build/asan}"
STAGE="$BUILD/stage"
MODE="test"
if [[ "${1:-}" == "build" ]]; then MODE="build"; shift; fi
if [[ "${1:-}" == "--" ]]; then shift; fi

log() { echo "[sanitize] $*" >&2; }
t0=$(date +%s)

# --- build tools ---------------------------------------------------------------------------------
need=()
command -v cmake >/dev/null 2>&1 || need+=(cmake)
command -v ninja >/dev/null 2>&1 || need+=(ninja)
"$PYTHON" -c "import pybind11" >/dev/null 2>&1 || need+=(pybind11)
have_eigen=$("$PYTHON" - <<'EOF'
import os, sys
dirs = [os.path.join(p, "cmeel.prefix", "share", "eigen3") for p in sys.path]
dirs += ["/usr/share/eigen3/cmake", "/usr/lib/cmake/eigen3", "/usr/local/share/eigen3/cmake"]
print(int(any(os.path.isdir(d) for d in dirs)))
EOF
)
[[ "$have_eigen" == 1 ]] || need+=(cmeel-eigen)
if ((${#need[@]})); then
  if [[ "${NORMKIT_SANITIZE_NO_INSTALL:-0}" == 1 ]]; then
    log "missing build tools: ${need[*]}"; exit 2
  fi
  log "installing build tools: ${need[*]}"
  "$PYTHON" -m pip install --quiet "${need[@]}"
  hash -r
fi

# --- configure and build -------------------------------------------------------------------------
PYBIND11_DIR="$("$PYTHON" -m pybind11 --cmakedir)"
PY_EXE="$("$PYTHON" -c 'import sys; print(sys.executable)')"
if [[ ! -f "$BUILD/build.ninja" ]]; then
  cmake -S "$ROOT" -B "$BUILD" -G Ninja \
    -DCMAKE_BUILD_TYPE=RelWithDebInfo \
    -DNORMKIT_BUILD_PYTHON=ON -DNORMKIT_SANITIZE=ON \
    -DPython_EXECUTABLE="$PY_EXE" -Dpybind11_DIR="$PYBIND11_DIR" >&2
fi
ninja -C "$BUILD" _core >&2
SO="$(ls "$BUILD"/_core*.so | head -n1)"

CXX="$(sed -n 's/^CMAKE_CXX_COMPILER:[A-Z]*=//p' "$BUILD/CMakeCache.txt")"
CXX="${CXX:-c++}"
LIBASAN="$("$CXX" -print-file-name=libasan.so)"
LIBUBSAN="$("$CXX" -print-file-name=libubsan.so)"
for lib in "$LIBASAN" "$LIBUBSAN"; do
  [[ "$lib" == /* && -e "$lib" ]] || { log "sanitizer runtime not found: $lib (compiler $CXX)"; exit 2; }
done

# --- stage: the Python package with the sanitized extension --------------------------------------
rm -rf "$STAGE"
mkdir -p "$STAGE/normkit"
(cd "$ROOT/python/normkit" && tar --exclude='_core*.so' --exclude='__pycache__' -cf - .) | tar -C "$STAGE/normkit" -xf -
ln -s "$SO" "$STAGE/normkit/$(basename "$SO")"
cat > "$STAGE/normkit.env" <<EOF
export LD_PRELOAD="$LIBASAN $LIBUBSAN\${LD_PRELOAD:+ \$LD_PRELOAD}"
export PYTHONPATH="$STAGE\${PYTHONPATH:+:\$PYTHONPATH}"
EOF
# A pytest plugin that fails the run if the tests imported some other normkit.
cat > "$STAGE/_normkit_sanitize_check.py" <<EOF
import os
import sys
import pytest

STAGE = "$STAGE"

def pytest_collection_finish(session):
    import normkit._core
    where = getattr(sys.modules["normkit._core"], "__file__", "")
    if not where.startswith(STAGE + "/"):
        raise pytest.UsageError(f"sanitize: tests imported normkit._core from {where}, not from {STAGE}")

def pytest_runtest_logstart(nodeid, location):
    # A sanitizer kills the process without a Python traceback: remember which test ran last.
    path = os.environ.get("NORMKIT_SANITIZE_CURRENT_TEST")
    if path:
        with open(path, "w") as f:
            f.write(nodeid + "\n")
EOF
log "built and staged in $(( $(date +%s) - t0 ))s: $STAGE"
if [[ "$MODE" == "build" ]]; then
  echo "$STAGE"
  exit 0
fi

# --- run the suite ---------------------------------------------------------------------------------
LOGDIR="$(mktemp -d "${TMPDIR:-/tmp}/normkit-sanitize.XXXXXX")"
export ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:abort_on_error=0:allocator_may_return_null=1:detect_stack_use_after_return=0:log_path=$LOGDIR/asan${ASAN_OPTIONS:+:$ASAN_OPTIONS}"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1:log_path=$LOGDIR/ubsan${UBSAN_OPTIONS:+:$UBSAN_OPTIONS}"
export LD_PRELOAD="$LIBASAN $LIBUBSAN${LD_PRELOAD:+ $LD_PRELOAD}"
export PYTHONPATH="$STAGE${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONFAULTHANDLER=1

# Sanity: the sanitized extension loads, and a bad read is not silently tolerated by the setup.
"$PYTHON" -c "import normkit, normkit._core as c; assert c.__file__.startswith('$STAGE/'), c.__file__; print('[sanitize] normkit', normkit.__version__, normkit.cpu_info())" >&2

# --capture=sys: pytest captures Python-level output only, so a report the runtime writes to fd 2
# right before it kills the process reaches the terminal (with fd capture it would be lost). The
# stream is also kept and searched: UBSan ignores log_path when loaded next to ASan.
export NORMKIT_SANITIZE_CURRENT_TEST="$LOGDIR/current_test"
t1=$(date +%s)
set +e
(cd "$ROOT" && "$PYTHON" -m pytest -p _normkit_sanitize_check -p no:cacheprovider --capture=sys \
   -m "not slow" -q "$@") 2> >(tee "$LOGDIR/stderr" >&2)
rc=$?
set -e
wait  # for tee
log "pytest exit code $rc after $(( $(date +%s) - t1 ))s (total $(( $(date +%s) - t0 ))s)"

found=0
for f in "$LOGDIR"/asan*; do
  [[ -e "$f" ]] || continue
  found=1; echo "===== $f" >&2; cat "$f" >&2
done
if grep -qE "runtime error:|ERROR: (Address|Leak|UndefinedBehavior)Sanitizer|SUMMARY: (Address|UndefinedBehavior)Sanitizer" "$LOGDIR/stderr"; then
  found=1
fi
if ((found)); then
  log "SANITIZER REPORT (see above); last test started: $(cat "$LOGDIR/current_test" 2>/dev/null || echo '?')"
  rm -rf "$LOGDIR"
  exit 1
fi
if ((rc != 0)) && [[ -f "$LOGDIR/current_test" ]] && ! grep -qE "passed|failed|error|skipped|deselected" "$LOGDIR/stderr" 2>/dev/null; then
  log "pytest died; last test started: $(cat "$LOGDIR/current_test")"
fi
rm -rf "$LOGDIR"
exit "$rc"
