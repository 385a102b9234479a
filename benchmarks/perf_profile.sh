#!/bin/bash
# Profiles one bench server under echo load with perf and prints its CPU
# time per message by category (benchmarks/perf_categories.py).
#
#   bash benchmarks/perf_profile.sh SERVER [connections] [inflight]
#   e.g. bash benchmarks/perf_profile.sh iocp-server 10 16
#
# Run from the root of a built tree (python setup.py build_ext --inplace)
# on a machine with at least 2 CPUs: the server runs on CPU 0, the load
# generator on CPU 1; perf records the server for 3 s of a 4 s load.
set -euo pipefail
S=$1; C=${2:-100}; I=${3:-1}
PY=${PY:-python}
P=$((20000 + RANDOM % 10000))
OUT=${OUT:-/tmp/perf.$S.data}
taskset -c 0 "$PY" -m iocp.bench.servers "$S" --port "$P" &
SP=$!
trap 'kill $SP 2>/dev/null || true' EXIT
sleep 2
taskset -c 1 "$PY" -m iocp.bench.loadgen --port "$P" --connections "$C" --size 64 \
    --inflight "$I" --threads 1 --warmup 1 --duration 4 > "/tmp/lg.$S.json" &
LP=$!
sleep 1.5
perf record -q -g -p "$SP" -o "$OUT" -- sleep 3 > /dev/null 2>&1
wait "$LP"
kill -INT "$SP"; wait "$SP" 2>/dev/null || true
MSGS=$("$PY" -c "import json; print(json.load(open('/tmp/lg.$S.json'))['msgs_per_s'] * 3)")
echo "$S: $("$PY" -c "print(f'{$MSGS / 3:,.0f}')") msgs/s"
"$PY" "$(dirname "$0")/perf_categories.py" "$OUT" "$MSGS"
