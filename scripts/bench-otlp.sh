#!/usr/bin/env bash
# End-to-end OTLP/gRPC figure, beside its baseline in the same run:
#   1. decode-and-discard baseline: tallyd-loadgen --otlp-baseline-server (tonic + prost decode,
#      empty response; nothing else)
#   2. tallyd: decode → map → dedup → pre-aggregate → durable ack (ingest log, fsync) → checkpoint
# Same load generator flags for both (default: batches of 1,000 delta points), against loopback.
# Usage: scripts/bench-otlp.sh [loadgen flags...]   (DURATION=secs, PORT=port, SYNC=fsync|none)
source "$(dirname "$0")/bench-lib.sh"
port=${PORT:-18090}
grpc_port=$((port + 1))
baseline_port=$((port + 2))

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

TALLYD__STORAGE__INGEST_LOG_SYNC="${SYNC:-fsync}" start_tallyd "$dir/data" "$port" "$grpc_port"
wait_ready "$port"
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
