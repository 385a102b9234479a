#!/usr/bin/env bash
# `make wheels-check`: build the sdist with `python -m build`, then for every
# pyenv CPython 3.9-3.13 build a wheel *from that sdist* (so a file missing
# from the sdist fails here, not on a user's machine), install it in a fresh
# venv and run the test suite from a copy of tests/ outside the source tree
# (tests/wheels/run_installed.py).
#
# The sdist is built from `git archive HEAD` when the tree is a git checkout
# (what CI and users get), else from the tree as it is; IOCP_WHEELS_FROM_TREE=1
# forces the working tree.
# Env: IOCP_WHEELS_PYTHONS="3.11 3.13" to pick versions; IOCP_WHEELS_KEEP=1.
# Prints "wheels: N passed, N failed" (one per Python) and exits non-zero if
# any failed or none ran.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
work="$(mktemp -d /tmp/iocp-wheels.XXXXXX)"
cleanup() { [ "${IOCP_WHEELS_KEEP:-0}" = 1 ] && echo "kept $work" || rm -rf "$work"; }
trap cleanup EXIT
t0=$(date +%s)
stamp() { printf '\n== %s (%ss)\n' "$*" "$(( $(date +%s) - t0 ))"; }

hostpy="${IOCP_WHEELS_HOST_PYTHON:-python3}"
versions="${IOCP_WHEELS_PYTHONS:-3.9 3.10 3.11 3.12 3.13}"
pyenv_root="${PYENV_ROOT:-$HOME/.pyenv}"

stamp "sdist"
"$hostpy" -m venv "$work/tool"
timeout 600 "$work/tool/bin/pip" install -q build
src="$root"
if [ "${IOCP_WHEELS_FROM_TREE:-0}" != 1 ] && git -C "$root" rev-parse --git-dir >/dev/null 2>&1; then
    mkdir -p "$work/src"
    git -C "$root" archive HEAD | tar -x -C "$work/src"
    src="$work/src"
    echo "building from git HEAD $(git -C "$root" rev-parse --short HEAD)"
fi
timeout 900 "$work/tool/bin/python" -m build --sdist --outdir "$work/dist" "$src"
sdist="$(ls "$work"/dist/*.tar.gz)"
mkdir -p "$work/sdist"
tar -xzf "$sdist" -C "$work/sdist"
sdir="$(ls -d "$work"/sdist/*/)"
echo "sdist: $(basename "$sdist") ($(tar -tzf "$sdist" | wc -l) files)"

passed=0; failed=0; results=()
for v in $versions; do
    py="$(ls -d "$pyenv_root"/versions/"$v".*/bin/python 2>/dev/null | sort -V | tail -1 || true)"
    if [ -z "$py" ]; then
        echo "no pyenv Python $v: FAILED"; failed=$((failed + 1)); results+=("$v: missing"); continue
    fi
    stamp "Python $v ($py)"
    vdir="$work/py$v"
    ok=1
    {
        "$py" -m venv "$vdir/venv" &&
        timeout 600 "$vdir/venv/bin/pip" install -q build pytest &&
        timeout 1200 "$vdir/venv/bin/python" -m build --wheel --outdir "$vdir/dist" "$sdir" \
            > "$vdir.build.log" 2>&1 &&
        whl="$(ls "$vdir"/dist/*.whl)" && echo "built $(basename "$whl")" &&
        timeout 600 "$vdir/venv/bin/pip" install -q "$whl" &&
        timeout 1800 "$vdir/venv/bin/python" "$root/tests/wheels/run_installed.py" "$root"
    } || ok=0
    if [ "$ok" = 1 ]; then
        passed=$((passed + 1)); results+=("$v: passed")
    else
        [ -f "$vdir.build.log" ] && tail -40 "$vdir.build.log"
        failed=$((failed + 1)); results+=("$v: FAILED")
    fi
done

stamp "summary"
printf '  %s\n' "${results[@]}"
echo "wheels: $passed passed, $failed failed"
[ "$failed" -eq 0 ] && [ "$passed" -gt 0 ]
