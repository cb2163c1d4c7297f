#!/usr/bin/env bash
# Kafka end to end against a real broker (tansu, in memory, loopback), beside a bare consumer in
# the same run: pre-fill a 4-partition topic with N CloudEvents (~180 bytes, one per message,
# keyed by tenant), count them with a bare rdkafka consumer, then let tallyd consume, aggregate
# and checkpoint them, then count again with the bare consumer. Prints the rates and the ratio to
# the bare consumer's mean.   usage: scripts/bench-kafka.sh [N]
set -euo pipefail
cd "$(dirname "$0")/.."
n="${1:-1000000}"
source scripts/env.sh
cargo build --release --locked --bin tallyd --bin tallyd-loadgen >&2
bin="$CARGO_TARGET_DIR/release"
broker=$(scripts/broker.sh start)
work=$(mktemp -d)
trap 'scripts/broker.sh stop; [[ -n "${pid:-}" ]] && kill "$pid" 2>/dev/null; rm -rf "$work"' EXIT
topic="bench-$(date +%s)"
"${CARGO_HOME:-$HOME/.cargo}/bin/tansu" topic create --broker "tcp://$broker" --partitions 4 "$topic" >&2

echo "produce: $n events into $topic" >&2
"$bin/tallyd-loadgen" --kafka-produce "$broker" --kafka-topic "$topic" --events "$n" --dup-pct 1 --late-pct 1
echo "baseline: bare consumer" >&2
baseline=$("$bin/tallyd-loadgen" --kafka-count "$broker" --kafka-topic "$topic" --events "$n")
echo "$baseline"

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cat >"$work/tallyd.toml" <<TOML
$(sed -n '/^\[\[meters\]\]/,$p' config/tallyd.toml | sed '1i # meters of the embedded default')
[server]
http_addr = "127.0.0.1:$port"
[storage]
data_dir = "$work/data"
[kafka]
brokers = "$broker"
topics = ["$topic"]
group_id = "$topic"
TOML
# [[meters]] tables must come last in TOML: move the server/kafka sections first.
python3 - "$work/tallyd.toml" <<'PY'
import sys, re
text = open(sys.argv[1]).read()
meters, rest = text.split("[server]", 1)
open(sys.argv[1], "w").write("[server]" + rest + "\n" + meters)
PY
"$bin/tallyd" run --config "$work/tallyd.toml" --log-level warn &
pid=$!
metric() { curl -s "http://127.0.0.1:$port/metrics" | awk -v m="$1" '$1==m {print $2}'; }
first=""; start=$(date +%s.%N)
while true; do
  count=$(metric tallyd_kafka_messages_total || true); count=${count:-0}
  now=$(date +%s.%N)
  if [[ -z "$first" && "${count%.*}" -gt 0 ]]; then first=$now; first_count=${count%.*}; fi
  if [[ "${count%.*}" -ge "$n" ]]; then break; fi
  if (( $(echo "$now - $start > 600" | bc) )); then echo "tallyd consumed only $count" >&2; exit 1; fi
  sleep 0.2
done
# Everything consumed; wait for the checkpoint that makes it durable (lag → 0).
sleep 1
secs=$(echo "$now - $first" | bc -l)
rate=$(echo "($n - $first_count) / $secs" | bc -l)
curl -s "http://127.0.0.1:$port/metrics" | grep -E '^tallyd_(ingest_events_total|kafka_offset_gaps_total|checkpoint_lag)' >&2 || true
kill "$pid"; wait "$pid" 2>/dev/null || true; pid=""
# The broker's rate drifts as its in-memory topic ages (one run: 14 k, the next 11 k msg/s):
# the bare consumer reads the topic again after tallyd, and tallyd is compared with the mean.
echo "baseline again: bare consumer" >&2
again=$("$bin/tallyd-loadgen" --kafka-count "$broker" --kafka-topic "$topic" --events "$n")
echo "$again"
per_sec() { python3 -c 'import json,sys; print(json.load(sys.stdin)["per_sec"])'; }
before=$(echo "$baseline" | per_sec); after=$(echo "$again" | per_sec)
base=$(echo "($before + $after) / 2" | bc -l)
printf '{"tallyd_per_sec": %.0f, "baseline_per_sec": %.0f, "ratio": %.3f}\n' "$rate" "$base" "$(echo "$rate / $base" | bc -l)"
printf '# bare consumer before tallyd %.0f, after %.0f msg/s\n' "$before" "$after"
