#!/usr/bin/env bash
# Profiles slim-bus's consumer: the `consume` case (no-op typed handler, max_concurrent 64,
# max_count 100) in a process of its own, against a throwaway redis-server on a free port.
#
#   bench/profile.sh                    # callgrind, 20k entries (about a minute)
#   TOOL=perf bench/profile.sh          # perf record -e cpu-clock (where perf works)
#   ENTRIES=50000 KIND=raw bench/profile.sh   # the hand-written baseline loop instead
#
# Output goes to $OUT (default target dir's profile/); the script prints the top of the
# report. Needs redis-server, and valgrind or perf.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

tool="${TOOL:-callgrind}"
entries="${ENTRIES:-20000}"
kind="${KIND:-consume}"
target_dir="${CARGO_TARGET_DIR:-target}"
out="${OUT:-$target_dir/profile}"
mkdir -p "$out"

bin="$(cargo bench -p slim-bus-bench --no-run 2>&1 |
  sed -n 's/.*Executable benches\/throughput.rs (\(.*\))$/\1/p')"
[[ -x "$bin" ]] || { echo "error: could not find the throughput bench binary" >&2; exit 1; }

port="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
dir="$(mktemp -d)"
redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly no --dir "$dir" \
  --daemonize no >"$dir/redis.log" 2>&1 &
redis_pid=$!
trap 'kill "$redis_pid" 2>/dev/null; wait "$redis_pid" 2>/dev/null; rm -rf "$dir"' EXIT
for _ in $(seq 100); do
  redis-cli -p "$port" ping >/dev/null 2>&1 && break
  sleep 0.1
done
url="redis://127.0.0.1:$port/"

"$bin" --child prefill --url "$url" --stream profile --entries "$entries"
case "$tool" in
  callgrind)
    file="$out/callgrind.$kind.out"
    valgrind --tool=callgrind --callgrind-out-file="$file" \
      "$bin" --child "$kind" --url "$url" --stream profile --entries "$entries"
    callgrind_annotate --inclusive=yes "$file" 2>/dev/null | head -80
    echo "full report: callgrind_annotate --inclusive=yes $file"
    ;;
  perf)
    file="$out/perf.$kind.data"
    perf record -e cpu-clock -F 4999 -g -o "$file" \
      "$bin" --child "$kind" --url "$url" --stream profile --entries "$entries"
    perf report -i "$file" --no-children --percent-limit 1 --stdio 2>/dev/null | head -80
    echo "full report: perf report -i $file"
    ;;
  *)
    echo "error: TOOL must be callgrind or perf, not $tool" >&2
    exit 2
    ;;
esac
