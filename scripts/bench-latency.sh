#!/usr/bin/env bash
# Event-to-queryable latency at half the peak load (performance issue, item 6), per protocol:
#   1. peak: closed loop for PEAK_DURATION seconds (HTTP batches of 500; OTLP/gRPC 1 000 points);
#   2. open loop at 50 % of that peak for DURATION seconds, with a probe every PROBE_MS ms: one
#      event sent over the same protocol, then the query API polled until it counts it.
# Reports the probes' p50/p99 beside the flush interval (the target is p99 < 2 × flush interval).
# Usage: scripts/bench-latency.sh   (DURATION, PEAK_DURATION, PROBE_MS, PORT)
source "$(dirname "$0")/bench-lib.sh"
port=${PORT:-18110}
grpc_port=$((port + 1))
flush_ms=1000
TALLYD__AGGREGATE__FLUSH_INTERVAL_MS=$flush_ms start_tallyd "$dir/data" "$port" "$grpc_port"
wait_ready "$port"

for protocol in http otlp; do
  if [[ $protocol == http ]]; then
    flags=(--url "http://127.0.0.1:$port" --batch-size 500)
  else
    flags=(--url "http://127.0.0.1:$port" --otlp-grpc "127.0.0.1:$grpc_port" --batch-size 1000)
  fi
  echo "## $protocol: peak (closed loop, 8 in flight)" >&2
  "$bin/tallyd-loadgen" "${flags[@]}" --concurrency 8 --duration-secs "${PEAK_DURATION:-10}" \
    --json-out "$dir/$protocol-peak.json" >/dev/null
  half=$(python3 -c "import json,sys; print(int(json.load(open(sys.argv[1]))['events_per_sec'] / 2))" "$dir/$protocol-peak.json")
  echo "## $protocol: open loop at $half/s with probes every ${PROBE_MS:-20} ms" >&2
  "$bin/tallyd-loadgen" "${flags[@]}" --concurrency 32 --rate "$half" --duration-secs "${DURATION:-20}" \
    --probe-interval-ms "${PROBE_MS:-20}" --json-out "$dir/$protocol-half.json" >/dev/null
  python3 - "$protocol" "$dir/$protocol-peak.json" "$dir/$protocol-half.json" "$flush_ms" <<'PY'
import json, sys
protocol, peak, half, flush_ms = sys.argv[1], json.load(open(sys.argv[2])), json.load(open(sys.argv[3])), int(sys.argv[4])
probe = half["event_to_queryable"]
p50, p99 = probe["latency_ms"]["p50"], probe["latency_ms"]["p99"]
print(f"# event-to-queryable {protocol}: p50 {p50} ms, p99 {p99} ms, max {probe['latency_ms']['max']} ms "
      f"({probe['seen']} of {probe['probes']} probes seen, {probe['timeouts']} timeouts) "
      f"at {half['events_per_sec']:.0f}/s = 50 % of peak {peak['events_per_sec']:.0f}/s; "
      f"request p99 {half['latency_ms']['p99']} ms; flush interval {flush_ms} ms; "
      f"p99 / (2 x flush) = {p99 / (2 * flush_ms):.1%}")
PY
done
