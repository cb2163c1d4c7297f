#!/usr/bin/env bash
# A/B of two tallyd builds on this noisy 2-core machine, where single throughput runs move by
# ±40 %: the same fixed-rate load (open loop, so both do the same work) against each build in
# turn, ROUNDS times, and per run the daemon's own CPU time (utime + stime from /proc) per
# million accepted points or events, the request p50/p99 and peak RSS.
# Usage: scripts/bench-ab.sh OLD_DIR NEW_DIR [loadgen flags...]
#   OLD_DIR / NEW_DIR: directories holding a `tallyd` binary (e.g. a copy of an older build).
#   Env: RATE (default 150000), DURATION (15 s), ROUNDS (2),
#        PROTO (loadgen target flag: --otlp-grpc, the default, or --url for HTTP CloudEvents),
#        OLD_CONFIG / NEW_CONFIG (each side's config file; default: the embedded one's copy),
#        METRICS_GREP (print the daemon's metrics matching this regex after each run).
# The load generator is this checkout's; it runs on the same cores.
source "$(dirname "$0")/bench-lib.sh"
old_dir=${1:?usage: scripts/bench-ab.sh OLD_DIR NEW_DIR [loadgen flags...]}
new_dir=${2:?usage: scripts/bench-ab.sh OLD_DIR NEW_DIR [loadgen flags...]}
shift 2
loadgen="$bin/tallyd-loadgen"
proto=${PROTO:---otlp-grpc}
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
port=${PORT:-18600}
# A build just before leaves hundreds of MB of dirty pages; their writeback ~30 s later stalled
# the ingest log's fsyncs in whichever run it hit (p99 87-156 ms in round 1, four times).
sync
for round in $(seq 1 "${ROUNDS:-2}"); do
  for side in old new; do
    if [ "$side" = old ]; then bin=$old_dir; CONFIG=${OLD_CONFIG:-}; else bin=$new_dir; CONFIG=${NEW_CONFIG:-}; fi
    port=$((port + 3))
    CONFIG=$CONFIG start_tallyd "$dir/data-$side-$round" "$port" "$((port + 1))"
    wait_ready "$port" 300
    if [ "$proto" = --url ]; then target="http://127.0.0.1:$port"; else target="127.0.0.1:$((port + 1))"; fi
    before=$(cpu_ticks "$pid")
    "$loadgen" "$proto" "$target" --rate "${RATE:-150000}" --duration-secs "${DURATION:-15}" \
      --json-out "$dir/$side-$round.json" "$@" >/dev/null 2>&1
    sleep 3 # the checkpoint of the tail belongs to the run
    after=$(cpu_ticks "$pid")
    rss=$(awk '/VmHWM/ {print $2}' "/proc/$pid/status")
    if [ -n "${METRICS_GREP:-}" ]; then
      curl -fsS "http://127.0.0.1:$port/metrics" | grep -E "$METRICS_GREP" | sed "s/^/  $side: /" || true
    fi
    kill "$pid"
    wait "$pid" 2>/dev/null || true
    python3 - "$dir/$side-$round.json" "$side" "$round" "$before" "$after" "$rss" "$(getconf CLK_TCK)" <<'PY'
import json, sys
summary = json.load(open(sys.argv[1]))
side, run, before, after, rss, hz = sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), sys.argv[6], int(sys.argv[7])
cpu = (after - before) / hz
acked = summary["events_acked"]
print(f"{side} (round {run}): {summary['events_per_sec']:.0f}/s, p50 {summary['latency_ms']['p50']} ms, "
      f"p99 {summary['latency_ms']['p99']} ms, errors {summary['errors']}, daemon CPU {cpu:.2f} s "
      f"= {cpu / acked * 1e6:.2f} CPU-s per M, peak RSS {int(rss) // 1024} MB")
PY
  done
done
