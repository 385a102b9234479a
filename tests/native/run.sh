#!/usr/bin/env bash
# Builds the native C driver (tests/native/driver.c) against the Linux
# backends and runs it against every backend that probes usable here.
# `make native-test`.  Prints "native: N passed, N failed"; exits non-zero
# on failure.  Extra arguments go to the driver: [backend|all] [test].
# Env: CC (default cc), IOCP_NATIVE_CFLAGS (e.g. -fsanitize=address,undefined).
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
src="$root/src/native"
out="${IOCP_NATIVE_OUT:-$(mktemp -d)}"
trap '[ -z "${IOCP_NATIVE_OUT:-}" ] && rm -rf "$out"' EXIT

srcs=("$src"/*.c "$src/posix/thread.c" "$src/linux/sock.c" "$src/linux/epoll.c")
defs=(-D_GNU_SOURCE)
if [ -f "$src/linux/uring.c" ]; then
    srcs+=("$src"/linux/uring*.c)
    defs+=(-DIOCP_WITH_URING)
fi
libs=(-lpthread)
# uring.c may use liburing if the system has it; harmless otherwise.
if [ -f "$src/linux/uring.c" ] && grep -q '<liburing.h>' "$src/linux/uring.c"; then
    libs+=(-luring)
fi

"${CC:-cc}" -std=c99 -O2 -g -Wall -Wextra -Werror ${IOCP_NATIVE_CFLAGS:-} "${defs[@]}" \
    -I"$src" -o "$out/driver" "$root/tests/native/driver.c" "${srcs[@]}" "${libs[@]}"
echo "built $out/driver from: ${srcs[*]#$root/}"
timeout "${IOCP_NATIVE_TIMEOUT:-600}" "$out/driver" "$@"
