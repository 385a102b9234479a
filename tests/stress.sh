#!/usr/bin/env bash
# make stress-test: the whole suite, STRESS_RUNS times (default 3) back to
# back, while a CPU hog keeps every core busy.  Flaky tests show up here;
# every run must pass.  Exit status 0 only if every run passed.
#
# The hog is Debian's stress-ng if it is there (installed with apt-get when
# we are root and can), else one shell busy-loop per core.  It is started
# here and always stopped here: on success, on failure, on Ctrl-C.
#
# Environment: PY (python, default python3), STRESS_RUNS (default 3),
# STRESS_PYTEST_ARGS (extra pytest arguments, e.g. "-x"),
# STRESS_HOG=stress-ng|loop (force one kind of hog).
set -u

py="${PY:-python3}"
runs="${STRESS_RUNS:-3}"
cores="$(nproc 2>/dev/null || getconf _NPROCESSORS_ONLN 2>/dev/null || echo 2)"
root="$(cd "$(dirname "$0")/.." && pwd)"
logs="$(mktemp -d "${TMPDIR:-/tmp}/iocp-stress.XXXXXX")"
hog_pids=()
suite=""

stop_suite() {
    # The suite runs in its own process group, so that a signal to this
    # script (whose traps wait for no foreground command) stops it at once.
    if [ -n "$suite" ]; then
        kill -TERM -- "-$suite" 2>/dev/null
        wait "$suite" 2>/dev/null
        suite=""
    fi
}

stop_hog() {
    local p
    for p in "${hog_pids[@]}"; do
        # Each hog leads its own process group (setsid): stress-ng's workers too.
        kill -TERM -- "-$p" 2>/dev/null || kill -TERM "$p" 2>/dev/null
    done
    for p in "${hog_pids[@]}"; do
        wait "$p" 2>/dev/null
    done
    hog_pids=()
}
trap 'stop_suite; stop_hog' EXIT
trap 'exit 130' INT
trap 'exit 143' TERM HUP

want="${STRESS_HOG:-}"
if [ -z "$want" ] || [ "$want" = stress-ng ]; then
    if ! command -v stress-ng >/dev/null 2>&1 && [ "$(id -u)" = 0 ] \
        && command -v apt-get >/dev/null 2>&1; then
        echo "stress: installing stress-ng"
        timeout 300 apt-get install -y -qq stress-ng >/dev/null 2>&1 \
            || { timeout 300 apt-get update -qq >/dev/null 2>&1 \
                 && timeout 300 apt-get install -y -qq stress-ng >/dev/null 2>&1; }
    fi
fi

if [ "$want" != loop ] && command -v stress-ng >/dev/null 2>&1; then
    # --timeout: a last resort should this script be SIGKILLed (no trap runs).
    setsid stress-ng --cpu "$cores" --timeout 7200s --quiet &
    hog_pids+=("$!")
    echo "stress: stress-ng --cpu $cores (pid $!)"
else
    for _ in $(seq "$cores"); do
        # Busy as long as this script lives, even if it is SIGKILLed.
        setsid bash -c 'while kill -0 "$0" 2>/dev/null; do :; done' "$$" &
        hog_pids+=("$!")
    done
    echo "stress: $cores busy-loop processes (pids ${hog_pids[*]})"
fi

status=0
summaries=()
cd "$root" || exit 2
for i in $(seq "$runs"); do
    echo "stress: run $i of $runs"
    log="$logs/run$i.log"
    # shellcheck disable=SC2086  # STRESS_PYTEST_ARGS is a word list
    setsid bash -c 'log="$1"; shift; timeout --foreground 3600 "$@" 2>&1 | tee "$log"; exit "${PIPESTATUS[0]}"' \
        _ "$log" "$py" -m pytest -q -p no:cacheprovider ${STRESS_PYTEST_ARGS:-} tests &
    suite="$!"
    wait "$suite"
    rc="$?"
    suite=""
    line="$(grep -E '^=* ?[0-9]+ (passed|failed|error)|^=+ .*(passed|failed|error).* in ' "$log" \
        | tail -n 1 | tr -d '=' | sed 's/^ *//; s/ *$//')"
    summaries+=("run $i: exit $rc: ${line:-no summary line}")
    [ "$rc" = 0 ] || status=1
done
stop_hog

echo "stress: results (logs in $logs)"
for s in "${summaries[@]}"; do
    echo "  $s"
done
if [ "$status" = 0 ]; then
    echo "stress: all $runs runs passed"
else
    echo "stress: FAILED"
fi
exit "$status"
