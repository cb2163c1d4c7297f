#!/usr/bin/env bash
# End-to-end OTLP/gRPC figure, beside its baseline in the same run:
#   1. decode-and-discard baseline: tallyd-loadgen --otlp-baseline-server (tonic + prost decode,
#      empty response; nothing else)
#   2. tallyd: decode → map → dedup → pre-aggregate → durable ack (ingest log, fsync) → checkpoint
# Same load generator flags for both (default: batches of 1,000 delta points), against loopback.
# Usage: scripts/bench-otlp.sh [loadgen flags...]   (DURATION=secs, PORT=port, SYNC=fsync|none)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
source scripts/env.sh
cargo build --release --locked --bins >&2
bin="$CARGO_TARGET_DIR/release"
dir=$(mktemp -d)
port=${PORT:-18090}
grpc_port=$((port + 1))
baseline_port=$((port + 2))
pids=()
trap 'kill "${pids[@]}" 2>/dev/null; wait 2>/dev/null; rm -rf "$dir"' EXIT

wait_port() {
  for _ in $(seq 1 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.1
  done
  echo "port $1 did not open" >&2
  return 1
}

"$bin/tallyd-loadgen" --otlp-baseline-server "127.0.0.1:$baseline_port" &
pids+=($!)
wait_port "$baseline_port"
echo "## decode-only baseline" >&2
"$bin/tallyd-loadgen" --otlp-grpc "127.0.0.1:$baseline_port" --batch-size 1000 --duration-secs "${DURATION:-20}" \
  --json-out "$dir/baseline.json" "$@"
kill "${pids[0]}"

TALLYD__SERVER__HTTP_ADDR=127.0.0.1:$port \
TALLYD__SERVER__OTLP_GRPC_ADDR=127.0.0.1:$grpc_port \
TALLYD__SERVER__OTLP_HTTP_ADDR= \
TALLYD__STORAGE__DATA_DIR="$dir/data" \
TALLYD__STORAGE__INGEST_LOG_SYNC="${SYNC:-fsync}" \
TALLYD__EMIT__FILE__PATH="$dir/data/usage.jsonl" \
TALLYD__DEAD_LETTER__PATH="$dir/data/dead-letter.jsonl" \
  "$bin/tallyd" run --config config/tallyd.toml --log-level warn &
pid=$!
pids+=($pid)
wait_port "$grpc_port"
echo "## tallyd" >&2
"$bin/tallyd-loadgen" --otlp-grpc "127.0.0.1:$grpc_port" --batch-size 1000 --duration-secs "${DURATION:-20}" \
  --json-out "$dir/tallyd.json" "$@"
echo "# daemon peak RSS (kB): $(awk '/VmHWM/ {print $2}' /proc/$pid/status)" >&2
curl -fsS "http://127.0.0.1:$port/metrics" \
  | grep -E '^tallyd_(ingest_events_total|flush_duration_seconds_(sum|count)|checkpoint_series_total)' >&2
python3 - "$dir/baseline.json" "$dir/tallyd.json" <<'PY'
import json, sys
base, tallyd = (json.load(open(p)) for p in sys.argv[1:3])
print(f"# ratio tallyd / decode-only baseline: {tallyd['events_per_sec'] / base['events_per_sec']:.1%} "
      f"({tallyd['events_per_sec']:.0f} vs {base['events_per_sec']:.0f} points/s; "
      f"p99 {tallyd['latency_ms']['p99']} ms vs {base['latency_ms']['p99']} ms)")
PY
