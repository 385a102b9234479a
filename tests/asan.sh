#!/usr/bin/env bash
# `make asan`: the whole pytest suite under AddressSanitizer + UBSan.
#
# Rebuilds the extension with IOCP_ASAN=1 (setup.py adds
# -fsanitize=address,undefined), runs the suite -- which is parametrized
# over every backend that runs here, so io_uring and epoll both -- with the
# ASan runtime preloaded (python itself is not instrumented, so the runtime
# must come first), then rebuilds normally so the tree is left with a
# normal build whatever happened.  Extra arguments go to pytest.
#
# ASAN_OPTIONS=detect_leaks=0: CPython keeps interned objects and arenas
# to the end by design; LeakSanitizer would report them all.  Leaks of our
# own records are checked by the suite (port.stats() after every test).
set -uo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
PY="${PY:-python3}"
CC_FOR_ASAN="${CC:-gcc}"

rebuild_normal() {
    echo "asan.sh: rebuilding without sanitizers"
    "$PY" setup.py -q build_clib --force build_ext --inplace --force >/dev/null 2>&1 ||
        echo "asan.sh: normal rebuild FAILED" >&2
}
trap rebuild_normal EXIT

libasan="$("$CC_FOR_ASAN" -print-file-name=libasan.so)"
if [ ! -e "$libasan" ]; then
    echo "asan.sh: $CC_FOR_ASAN has no libasan.so ($libasan)" >&2
    exit 2
fi

echo "asan.sh: building with IOCP_ASAN=1"
# --force: build_clib does not notice changed flags on its own.
if ! IOCP_ASAN=1 "$PY" setup.py -q build_clib --force build_ext --inplace --force >/tmp/iocp-asan-build.log 2>&1; then
    echo "asan.sh: sanitizer build failed, see /tmp/iocp-asan-build.log" >&2
    exit 2
fi

# RSS-flatness tests measure the allocator, and ASan's quarantine holds
# freed memory back on purpose (256 MiB): they cannot pass here and say
# nothing about memory safety, so they are left to the normal run.
echo "asan.sh: running the suite with $libasan preloaded"
LD_PRELOAD="$libasan" \
ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:strict_string_checks=1:detect_stack_use_after_return=0" \
UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1" \
    "$PY" -m pytest -q -p no:cacheprovider tests -k "not rss" "$@"
rc=$?
if [ $rc -eq 0 ]; then
    echo "asan.sh: clean"
else
    echo "asan.sh: FAILED (pytest exit $rc)" >&2
fi
exit $rc
