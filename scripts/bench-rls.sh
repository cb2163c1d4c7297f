#!/usr/bin/env bash
# Envoy RLS over gRPC on loopback (issue 25's targets: ≥ 100 k decisions/s closed loop, p99 < 1 ms
# at 50 k/s), beside a do-nothing RLS server (answers OK) measured in the same run: closed loop
# on each, then open loop at RATE (default 50000) on each. Every call is one descriptor (a Zipf
# tenant of 1000, meter api_calls) against a plan with a rate limit (1000 a second) and a hard
# quota on the meter: the gate decides both. Prints one JSON summary per run.
# usage: DURATION=10 CONCURRENCY=64 CONNECTIONS=4 RATE=50000 scripts/bench-rls.sh
source "$(dirname "${BASH_SOURCE[0]}")/bench-lib.sh"
port=$(free_port); grpc=$(free_port); baseline=$(free_port)
cat config/tallyd.toml > "$dir/tallyd.toml"
cat >> "$dir/tallyd.toml" <<'TOML'
[[plans]]
id = "limited"
currency = "USD"
[[plans.limits]]
meter = "api_calls"
kind = "rate"
limit = 1000
per = "second"
[[plans.limits]]
meter = "api_calls"
kind = "quota"
limit = "1000000000"
TOML
sed -i 's/^default_plan = "payg"/default_plan = "limited"/' "$dir/tallyd.toml"
duration=${DURATION:-10}
load() { # load ADDR CONCURRENCY EXTRA...: one loadgen run against an RLS server
  local addr=$1 concurrency=$2; shift 2
  "$bin/tallyd-loadgen" --rls "$addr" --duration-secs "$duration" --tenants 1000 \
    --concurrency "$concurrency" --grpc-connections "${CONNECTIONS:-4}" --batch-size 1 "$@"
}
"$bin/tallyd-loadgen" --rls-baseline-server "127.0.0.1:$baseline" 2>>"$dir/baseline.log" &
pids+=("$!")
CONFIG="$dir/tallyd.toml" LIMITS_GRPC=$grpc start_tallyd "$dir/data" "$port"
wait_ready "$port"
sleep 0.5
closed=${CONCURRENCY:-64}
echo "== do-nothing RLS server, closed loop"; load "127.0.0.1:$baseline" "$closed"
echo "== tallyd, closed loop"; load "127.0.0.1:$grpc" "$closed"
echo "== do-nothing RLS server, open loop at ${RATE:-50000}/s"; load "127.0.0.1:$baseline" 512 --rate "${RATE:-50000}"
echo "== tallyd, open loop at ${RATE:-50000}/s"; load "127.0.0.1:$grpc" 512 --rate "${RATE:-50000}"
echo "== tallyd: decisions by outcome"
curl -fsS "http://127.0.0.1:$port/metrics" | grep -E '^tallyd_(limit_decisions_total|limits_requests_total)' || true
