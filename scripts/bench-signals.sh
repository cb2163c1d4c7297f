#!/usr/bin/env bash
# Usage-to-signal latency (issue 25's target: p99 ≤ 50 ms on one node for Watch and RLS):
# N tenants (default 300) each cross 80 % of a hard quota (Watch message timed from the 202)
# and then exhaust it (RLS OVER_LIMIT timed from the 202). Prints JSON distributions.
# KAFKA=1 also starts tansu (scripts/broker.sh) and times the signal topic's `exceeded` record.
# usage: N=300 [KAFKA=1] scripts/bench-signals.sh
source "$(dirname "${BASH_SOURCE[0]}")/bench-lib.sh"
port=$(free_port); grpc=$(free_port)
cat config/tallyd.toml > "$dir/tallyd.toml"
cat >> "$dir/tallyd.toml" <<'TOML'
[[plans]]
id = "latency"
currency = "USD"
[[plans.limits]]
meter = "tokens"
kind = "quota"
limit = "100"
thresholds = [80, 100]
TOML
sed -i 's/^default_plan = "payg"/default_plan = "latency"/' "$dir/tallyd.toml"
if [ "${KAFKA:-0}" = 1 ]; then
  brokers=$(scripts/broker.sh start)
  trap 'kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; scripts/broker.sh stop; rm -rf "$dir"' EXIT
  python3 - "$brokers" <<'PY'
import sys
from confluent_kafka.admin import AdminClient, NewTopic
admin = AdminClient({"bootstrap.servers": sys.argv[1]})
for future in admin.create_topics([NewTopic("bench-usage", 1, 1), NewTopic("bench.signals", 1, 1,
                                   config={"cleanup.policy": "compact"})]).values():
    future.result(30)
PY
  printf '\n[kafka]\nbrokers = "%s"\ntopics = ["bench-usage"]\ngroup_id = "bench-signals"\n' "$brokers" >> "$dir/tallyd.toml"
  sed -i 's/^signal_topic = .*/signal_topic = "bench.signals"/' "$dir/tallyd.toml"
  export KAFKA_BROKERS=$brokers SIGNAL_TOPIC=bench.signals
fi
CONFIG="$dir/tallyd.toml" LIMITS_GRPC=$grpc start_tallyd "$dir/data" "$port"
wait_ready "$port"
envoy=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/envoy-types-"$(awk '/name = "envoy-types"/{getline; gsub(/"/,"",$3); print $3}' Cargo.lock)"/proto | head -1)
python3 tests/limits/gen_stubs.py "$dir/stubs" "$envoy" proto
python3 tests/limits/signal_latency.py "$dir/stubs" "127.0.0.1:$grpc" "127.0.0.1:$port" "${N:-300}"
