#!/usr/bin/env bash
# Recovery time after SIGKILL (performance issue, item 8). For each SERIES count given:
#   1. a fresh tallyd takes SERIES events over HTTP, each its own series (1 M tenants × 1 000
#      dimension values, uniform, no duplicates, no late events; per-minute windows);
#   2. "behind": load continues and tallyd is killed with SIGKILL a second after it flows, while the
#      checkpoint still trails the fill (on 2 saturated cores it does: every event is a new
#      series), so the ingest log holds a long tail;
#   3. "settled": restarted, it is left to checkpoint until a cut finds almost nothing pending,
#      then killed a second into load again (the steady state: a tail of about a second);
# and after each kill the figure is the time from exec to /readyz answering (RocksDB open +
# WAL recovery, ingest-log replay, outbox redelivery), with the replayed tail.
# Baseline in the same run: the same restart on an empty data directory.
# Usage: scripts/bench-recovery.sh [SERIES...]   (default 1000000; PORT)
source "$(dirname "$0")/bench-lib.sh"
port=${PORT:-18120}
sizes=("$@")
[[ ${#sizes[@]} -gt 0 ]] || sizes=(1000000)
load=(--url "http://127.0.0.1:$port" --batch-size 500 --concurrency 8 --tenants 1000000
  --dim-cardinality 1000 --zipf-s 0 --dup-pct 0 --late-pct 0)

# restart DATA: starts tallyd on DATA; sets $seconds to the time until /readyz answers.
# (Not a command substitution: the daemon would inherit its pipe and hold it open.)
restart() {
  : >"$dir/tallyd.log"
  local started=$(date +%s.%N)
  LOG_LEVEL=info start_tallyd "$1" "$port"
  wait_ready "$port" 6000
  seconds=$(python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.2f}')" "$started" "$(date +%s.%N)")
  local line=$(grep -m1 ' recovered' "$dir/tallyd.log")
  field() { grep -o "$1=[0-9]*" <<<"$line" | cut -d= -f2; }
  replayed=$(field replayed_log_records)
  steps="store open $(field store_open_ms) ms, outbox $(field outbox_ms) ms, log open $(field log_open_ms) ms, replay $(field replay_ms) ms"
}

# crash SERIES DATA STATE: about a second into more load, SIGKILL; then restart and report.
crash() {
  local series=$1 data=$2 state=$3
  # (Its errors go to the log: a flag clap refused once left this load unsent, unnoticed.)
  "$bin/tallyd-loadgen" "${load[@]}" --duration-secs 5 --seed $RANDOM >/dev/null 2>>"$dir/loadgen.log" &
  local loader=$!
  # The generator first builds its samplers (8 × 1 M tenants), 1-4 s depending on the machine:
  # wait until its events flow, then a second more (a fixed 2.5 s once killed before any came).
  local before=$(metric tallyd_ingest_events_total "$port") flowing=0
  for _ in $(seq 1 300); do
    [[ $(metric tallyd_ingest_events_total "$port") -gt $((before + 20000)) ]] && { flowing=1; break; }
    sleep 0.1
  done
  if [[ $flowing == 0 ]]; then
    echo "bench-recovery: the crash load never flowed; loadgen said:" >&2
    cat "$dir/loadgen.log" >&2
    exit 1
  fi
  sleep 1
  local written=$(metric tallyd_checkpoint_series_total "$port")
  local accepted=$(metric tallyd_ingest_events_total "$port")
  local refused=$(metric tallyd_ingest_backpressure_total "$port")
  kill -9 "$pid"; wait "$pid" 2>/dev/null || true
  wait "$loader" 2>/dev/null || true
  local size=$(du -sm "$data/rocksdb" | cut -f1) log_mb=$(du -sm "$data/ingest-log" | cut -f1)
  restart "$data"
  echo "# recovery after SIGKILL ($state): $series series: ${seconds} s to ready (empty data dir: ${empty} s);" \
    "replayed ${replayed:-?} log batches ($steps); this process: ${written} series checkpointed, ${accepted} events" \
    "accepted, ${refused} requests refused as checkpoints were behind; RocksDB ${size} MB, ingest log ${log_mb} MB"
}

restart "$dir/empty"
empty=$seconds
kill "$pid"; wait "$pid" 2>/dev/null || true
for series in "${sizes[@]}"; do
  data="$dir/data-$series"
  start_tallyd "$data" "$port"
  wait_ready "$port"
  echo "## $series series: filling" >&2
  "$bin/tallyd-loadgen" "${load[@]}" --duration-secs 3600 --stop-after-events "$series" --seed "$series" >/dev/null
  crash "$series" "$data" behind
  echo "## $series series: settling" >&2
  # Settled: two checkpoints done since the restart (the first one takes the replayed tail) and
  # the latest cut held fewer than 1 000 series.
  for _ in $(seq 1 600); do
    flushes=$(metric tallyd_flush_duration_seconds_count "$port")
    pending=$(metric tallyd_aggregate_active_series "$port")
    [[ $flushes -ge 2 && $pending -lt 1000 ]] && break
    sleep 1
  done
  crash "$series" "$data" settled
  kill "$pid"; wait "$pid" 2>/dev/null || true
  rm -rf "$data"
done
