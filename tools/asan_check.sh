#!/usr/bin/env bash
# AddressSanitizer check of xloss's compiled ops: builds an ASan copy of every csrc/ops.cpp + csrc/cpu/*.cpp
# (XLOSS_EXT_SANITIZE=address, see xloss/_ext.py) in its own extensions directory, then runs
# tools/asan_check.py, which calls every op on valid and invalid input, with libasan preloaded (a sanitized
# shared library loaded into an uninstrumented Python needs the ASan runtime first).  Leak detection is off:
# Python and torch keep allocations alive until exit by design.
#
# Exit status: non-zero when the build fails, an op misbehaves, or ASan reports anything (ASan aborts the
# process on its first report; the log is also searched for "ERROR: AddressSanitizer" in case a report did not
# stop it).
#
# Environment: XLOSS_ASAN_EXT_DIR (default ~/.cache/xloss_asan_ext): where the ASan build is cached;
# PYTHON (default python).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python}"
export TORCH_EXTENSIONS_DIR="${XLOSS_ASAN_EXT_DIR:-$HOME/.cache/xloss_asan_ext}"
export XLOSS_EXT_SANITIZE=address
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's xloss, not another installed one
unset XLOSS_NO_EXT
mkdir -p "$TORCH_EXTENSIONS_DIR"

LIBASAN="$("${CXX:-g++}" -print-file-name=libasan.so)"
if [ ! -e "$LIBASAN" ]; then
  echo "asan_check: libasan.so not found (g++ -print-file-name=libasan.so gave '$LIBASAN')" >&2
  exit 2
fi

# libstdc++ too: Python itself does not link it, so without it ASan's __cxa_throw interceptor finds no real
# __cxa_throw at start-up and dies on the first C++ exception (every TORCH_CHECK of a bad-input call).
LIBSTDCXX="$("${CXX:-g++}" -print-file-name=libstdc++.so)"

LOG="$(mktemp)"
trap 'rm -f "$LOG"' EXIT
start=$(date +%s)
# One process: the JIT build (ninja, g++: they inherit the preload, harmless without leak detection) and the
# checks.  halt_on_error is the default: the first report aborts with exit code 1.
set +e
LD_PRELOAD="$LIBASAN:$LIBSTDCXX${LD_PRELOAD:+:$LD_PRELOAD}" \
ASAN_OPTIONS="detect_leaks=0:abort_on_error=0:halt_on_error=1:exitcode=86${ASAN_OPTIONS:+:$ASAN_OPTIONS}" \
  "$PYTHON" "$ROOT/tools/asan_check.py" 2>&1 | tee "$LOG"
rc=${PIPESTATUS[0]}
set -e
if grep -q "ERROR: AddressSanitizer" "$LOG"; then
  echo "asan_check: AddressSanitizer reported an error (exit status $rc)" >&2
  exit 1
fi
if [ "$rc" -ne 0 ]; then
  echo "asan_check: FAILED (exit status $rc)" >&2
  exit "$rc"
fi
echo "asan_check: passed in $(( $(date +%s) - start )) s"
