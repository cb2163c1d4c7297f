#!/usr/bin/env bash
# Recovery time after SIGKILL (performance issue, item 8). For each SERIES count given:
#   1. a fresh tallyd takes SERIES events over HTTP, each its own series (1 M tenants × 1 000
#      dimension values, uniform, no duplicates, no late events; per-minute windows);
#   2. load continues and tallyd is killed with SIGKILL in the middle of it (so the ingest log
#      has an unCheckpointed tail and a checkpoint may be in flight);
#   3. tallyd restarts on the same data; the figure is the time from exec to /readyz answering
#      (RocksDB open + WAL recovery, ingest-log replay, outbox redelivery).
# Baseline in the same run: the same restart on an empty data directory.
# Usage: scripts/bench-recovery.sh [SERIES...]   (default 1000000; PORT)
source "$(dirname "$0")/bench-lib.sh"
port=${PORT:-18120}
sizes=("$@")
[[ ${#sizes[@]} -gt 0 ]] || sizes=(1000000)
load=(--url "http://127.0.0.1:$port" --batch-size 500 --concurrency 8 --tenants 1000000
  --dim-cardinality 1000 --zipf-s 0 --dup-pct 0 --late-pct 0 --duration-secs 3600)

# restart DATA: starts tallyd on DATA; sets $seconds to the time until /readyz answers.
# (Not a command substitution: the daemon would inherit its pipe and hold it open.)
restart() {
  local started=$(date +%s.%N)
  LOG_LEVEL=info start_tallyd "$1" "$port"
  wait_ready "$port" 6000
  seconds=$(python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.2f}')" "$started" "$(date +%s.%N)")
}

restart "$dir/empty"
empty=$seconds
kill "$pid"; wait "$pid" 2>/dev/null || true
for series in "${sizes[@]}"; do
  data="$dir/data-$series"
  start_tallyd "$data" "$port"
  wait_ready "$port"
  echo "## $series series: filling" >&2
  "$bin/tallyd-loadgen" "${load[@]}" --stop-after-events "$series" --seed "$series" >/dev/null
  # Kill in the middle of continued load: one second in, the loadgen still sending.
  "$bin/tallyd-loadgen" "${load[@]}" --duration-secs 3 --seed 7 >/dev/null 2>&1 &
  loader=$!
  sleep 1
  written=$(metric tallyd_checkpoint_series_total "$port")
  accepted=$(metric tallyd_ingest_events_total "$port")
  flushes=$(metric tallyd_flush_duration_seconds_count "$port")
  flush_secs=$(metric tallyd_flush_duration_seconds_sum "$port")
  kill -9 "$pid"; wait "$pid" 2>/dev/null || true
  wait "$loader" 2>/dev/null || true
  size=$(du -sm "$data/rocksdb" | cut -f1)
  log_mb=$(du -sm "$data/ingest-log" | cut -f1)
  : >"$dir/tallyd.log"
  restart "$data"
  replayed=$(grep -o 'replayed_log_records=[0-9]*' "$dir/tallyd.log" | head -1 | cut -d= -f2)
  kill "$pid"; wait "$pid" 2>/dev/null || true
  echo "# recovery after SIGKILL: $series series: ${seconds} s to ready (empty data dir: ${empty} s); " \
    "series written by checkpoints ${written}, events accepted ${accepted}, RocksDB ${size} MB, " \
    "ingest log ${log_mb} MB, replayed ${replayed:-?} log records; ${flushes} checkpoints took ${flush_secs} s in all"
  rm -rf "$data"
done
