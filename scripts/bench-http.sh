#!/usr/bin/env bash
# End-to-end HTTP figure, beside its baseline in the same run:
#   1. decode-only baseline: tallyd-loadgen --baseline-server (tallyd's decoder, then 202; nothing else)
#   2. tallyd: decode → dedup → pre-aggregate → durable ack (ingest log, fsync) → checkpoint
# Same load generator flags for both, against loopback.
# Usage: scripts/bench-http.sh [loadgen flags...]   (DURATION=secs, PORT=port, SYNC=fsync|none)
source "$(dirname "$0")/bench-lib.sh"
port=${PORT:-18080}
baseline_port=$((port + 1))

"$bin/tallyd-loadgen" --baseline-server "127.0.0.1:$baseline_port" &
pids+=($!)
wait_ready "$baseline_port"
echo "## decode-only baseline" >&2
"$bin/tallyd-loadgen" --url "http://127.0.0.1:$baseline_port" --duration-secs "${DURATION:-20}" \
  --json-out "$dir/baseline.json" "$@"
kill "${pids[0]}"

TALLYD__STORAGE__INGEST_LOG_SYNC="${SYNC:-fsync}" start_tallyd "$dir/data" "$port"
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
