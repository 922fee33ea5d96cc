#!/usr/bin/env bash
# Fuzz normkit's functional and layer API (tests/fuzz/fuzz_api.py, atheris) for a bounded time.
# Exits non-zero on a finding: an exception outside TypeError/ValueError, a broken invariant,
# a crash or a sanitizer report. The failing input is saved under $NORMKIT_FUZZ_OUT (default
# build/fuzz-artifacts/); the log prints the command that reproduces it.
#
#   .ci/fuzz.sh [SECONDS] [extra libFuzzer flags...]        default 60 s in all
#
# Two phases share one corpus (build/fuzz-corpus, kept between runs):
#  1. coverage-guided, against the normal build (the installed normkit, or python/normkit with
#     its built extension);
#  2. against the ASan/UBSan build (when .ci/sanitize.sh has built one in build/asan, or with
#     NORMKIT_FUZZ_ASAN=1, which builds it): the corpus of phase 1 is replayed, then mutated.
#     With GCC's libasan preloaded, libasan provides the coverage hooks, so atheris's Python
#     coverage does not work in this phase (atheris warns); phase 1 supplies the guidance.
# With a sanitizer build the time is split evenly; NORMKIT_FUZZ_ASAN=0 skips phase 2.
# Environment: PYTHON (python3), NORMKIT_FUZZ_TARGETS (default functional,layer,core),
# NORMKIT_FUZZ_CORPUS, NORMKIT_FUZZ_OUT, NORMKIT_FUZZ_NO_INSTALL=1.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
TOTAL="${1:-60}"
shift || true
OUT="${NORMKIT_FUZZ_OUT:-$ROOT/build/fuzz-artifacts}"
CORPUS="${NORMKIT_FUZZ_CORPUS:-$ROOT/build/fuzz-corpus}"
ASAN_BUILD="${NORMKIT_ASAN_BUILD:-$ROOT/build/asan}"
STAGE="$ASAN_BUILD/stage"
TARGET="$ROOT/tests/fuzz/fuzz_api.py"
log() { echo "[fuzz] $*" >&2; }

if ! "$PYTHON" -c "import atheris" >/dev/null 2>&1; then
  if [[ "${NORMKIT_FUZZ_NO_INSTALL:-0}" == 1 ]]; then log "atheris is not installed"; exit 2; fi
  log "installing atheris"
  "$PYTHON" -m pip install --quiet atheris
fi

# --- which builds ----------------------------------------------------------------------------------
normal_pythonpath="${PYTHONPATH:-}"
if "$PYTHON" -c "import normkit._core" >/dev/null 2>&1; then
  normal="installed normkit"
elif ls "$ROOT"/python/normkit/_core*.so >/dev/null 2>&1; then
  normal_pythonpath="$ROOT/python${PYTHONPATH:+:$PYTHONPATH}"
  normal="normal build ($ROOT/python)"
else
  normal=""
fi
asan_mode="${NORMKIT_FUZZ_ASAN:-auto}"
sanitized=0
if [[ "$asan_mode" == 1 || ( "$asan_mode" == auto && -f "$ASAN_BUILD/build.ninja" ) ]]; then
  # (Re)build incrementally and restage, so the staged Python files are the current ones.
  "$ROOT/.ci/sanitize.sh" build >/dev/null
  sanitized=1
fi
if [[ -z "$normal" && "$sanitized" == 0 ]]; then
  log "no importable normkit: install it, build python/normkit/_core, or set NORMKIT_FUZZ_ASAN=1"; exit 2
fi
if [[ -n "$normal" && "$sanitized" == 1 ]]; then
  t_normal=$(( TOTAL / 2 )); t_asan=$(( TOTAL - TOTAL / 2 ))
elif [[ -n "$normal" ]]; then
  t_normal=$TOTAL; t_asan=0
else
  t_normal=0; t_asan=$TOTAL
fi

mkdir -p "$OUT" "$CORPUS"
found=0
count_artifacts() { find "$OUT" -maxdepth 1 -type f | wc -l; }

run_phase() {  # name seconds env-assignments...
  local name="$1" secs="$2"; shift 2
  (( secs > 0 )) || return 0
  local before after rc t0
  before=$(count_artifacts)
  t0=$(date +%s)
  log "phase '$name': ${secs}s against $(env "$@" "$PYTHON" -c 'import normkit._core as c; print(c.__file__)')"
  set +e
  env "$@" "$PYTHON" "$TARGET" -max_total_time="$secs" -timeout=30 -rss_limit_mb=8192 \
    -print_final_stats=1 -artifact_prefix="$OUT/" "${EXTRA[@]}" "$CORPUS" 2>&1 \
    | grep --line-buffered -v -E "^INFO: Instrumenting|^#[0-9]+.*(NEW|REDUCE|pulse) "
  rc=${PIPESTATUS[0]}
  set -e
  after=$(count_artifacts)
  log "phase '$name': exit code $rc after $(( $(date +%s) - t0 ))s; corpus $(ls "$CORPUS" | wc -l) inputs"
  if (( rc != 0 || after > before )); then
    found=1
    log "FINDING in phase '$name'. New artifacts (newest first):"
    ls -t "$OUT" | head -n $(( after > before ? after - before : 3 )) >&2
    log "reproduce: env $* $PYTHON -X faulthandler $TARGET $OUT/<artifact>"
  fi
}

EXTRA=("$@")
if [[ -n "$normal" ]]; then
  run_phase "coverage-guided, $normal" "$t_normal" "PYTHONPATH=$normal_pythonpath"
fi
if [[ "$sanitized" == 1 && "$found" == 0 ]]; then
  # shellcheck disable=SC1091
  preload="$(source "$STAGE/normkit.env" && echo "$LD_PRELOAD")"
  # abort_on_error: UBSan (a separate runtime from ASan here) would exit without libFuzzer
  # saving the input; an abort is a signal libFuzzer catches and records.
  run_phase "ASan+UBSan build" "$t_asan" \
    "LD_PRELOAD=$preload" "PYTHONPATH=$STAGE${PYTHONPATH:+:$PYTHONPATH}" \
    "ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:allocator_may_return_null=1:detect_stack_use_after_return=0${ASAN_OPTIONS:+:$ASAN_OPTIONS}" \
    "UBSAN_OPTIONS=halt_on_error=1:abort_on_error=1:print_stacktrace=1${UBSAN_OPTIONS:+:$UBSAN_OPTIONS}"
fi
if (( found )); then exit 1; fi
log "no finding"
