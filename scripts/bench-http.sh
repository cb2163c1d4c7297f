#!/usr/bin/env bash
# End-to-end HTTP figure: tallyd-loadgen → POST /api/v1/events → decode → dedup → aggregate →
# durable ack (ingest log, fsync) → checkpoint, against the real daemon on loopback.
# Usage: scripts/bench-http.sh [loadgen flags...]   (DURATION=secs, PORT=port, SYNC=fsync|none)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
source scripts/env.sh
cargo build --release --locked --bins >&2
bin="$CARGO_TARGET_DIR/release"
dir=$(mktemp -d)
port=${PORT:-18080}
TALLYD__SERVER__HTTP_ADDR=127.0.0.1:$port \
TALLYD__STORAGE__DATA_DIR="$dir/data" \
TALLYD__STORAGE__INGEST_LOG_SYNC="${SYNC:-fsync}" \
TALLYD__EMIT__FILE__PATH="$dir/data/usage.jsonl" \
TALLYD__DEAD_LETTER__PATH="$dir/data/dead-letter.jsonl" \
  "$bin/tallyd" run --config config/tallyd.toml --log-level warn &
pid=$!
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null; rm -rf "$dir"' EXIT
for _ in $(seq 1 100); do
  curl -fsS "http://127.0.0.1:$port/readyz" >/dev/null 2>&1 && break
  sleep 0.1
done
"$bin/tallyd-loadgen" --url "http://127.0.0.1:$port" --duration-secs "${DURATION:-20}" "$@"
echo "# daemon RSS (kB): $(awk '/VmHWM/ {print $2}' /proc/$pid/status)" >&2
curl -fsS "http://127.0.0.1:$port/metrics" | grep -E '^tallyd_(ingest_events_total|flush_duration_seconds_(sum|count)|checkpoint_series_total)' >&2
