#!/usr/bin/env bash
# End-to-end HTTP figure, beside its baseline in the same run:
#   1. decode-only baseline: tallyd-loadgen --baseline-server (tallyd's decoder, then 202; nothing else)
#   2. tallyd: decode → dedup → pre-aggregate → durable ack (ingest log, fsync) → checkpoint
# Same load generator flags for both, against loopback.
# Usage: scripts/bench-http.sh [loadgen flags...]   (DURATION=secs, PORT=port, SYNC=fsync|none)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
source scripts/env.sh
cargo build --release --locked --bins >&2
bin="$CARGO_TARGET_DIR/release"
dir=$(mktemp -d)
port=${PORT:-18080}
baseline_port=$((port + 1))
pids=()
trap 'kill "${pids[@]}" 2>/dev/null; wait 2>/dev/null; rm -rf "$dir"' EXIT

wait_ready() {
  for _ in $(seq 1 100); do
    curl -fsS "http://127.0.0.1:$1/readyz" >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  echo "port $1 did not become ready" >&2
  return 1
}

"$bin/tallyd-loadgen" --baseline-server "127.0.0.1:$baseline_port" &
pids+=($!)
wait_ready "$baseline_port"
echo "## decode-only baseline" >&2
"$bin/tallyd-loadgen" --url "http://127.0.0.1:$baseline_port" --duration-secs "${DURATION:-20}" \
  --json-out "$dir/baseline.json" "$@"
kill "${pids[0]}"

TALLYD__SERVER__HTTP_ADDR=127.0.0.1:$port \
TALLYD__STORAGE__DATA_DIR="$dir/data" \
TALLYD__STORAGE__INGEST_LOG_SYNC="${SYNC:-fsync}" \
TALLYD__EMIT__FILE__PATH="$dir/data/usage.jsonl" \
TALLYD__DEAD_LETTER__PATH="$dir/data/dead-letter.jsonl" \
  "$bin/tallyd" run --config config/tallyd.toml --log-level warn &
pid=$!
pids+=($pid)
wait_ready "$port"
echo "## tallyd" >&2
"$bin/tallyd-loadgen" --url "http://127.0.0.1:$port" --duration-secs "${DURATION:-20}" \
  --json-out "$dir/tallyd.json" "$@"
echo "# daemon peak RSS (kB): $(awk '/VmHWM/ {print $2}' /proc/$pid/status)" >&2
curl -fsS "http://127.0.0.1:$port/metrics" \
  | grep -E '^tallyd_(ingest_events_total|flush_duration_seconds_(sum|count)|checkpoint_series_total)' >&2
python3 - "$dir/baseline.json" "$dir/tallyd.json" <<'PY'
import json, sys
base, tallyd = (json.load(open(p)) for p in sys.argv[1:3])
print(f"# ratio tallyd / decode-only baseline: {tallyd['events_per_sec'] / base['events_per_sec']:.1%} "
      f"({tallyd['events_per_sec']:.0f} vs {base['events_per_sec']:.0f} events/s)")
PY
