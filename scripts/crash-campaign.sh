#!/usr/bin/env bash
# The crash campaign (tests/campaign/crash.py): HTTP, OTLP and Kafka usage with duplicates and
# late events while tallyd is SIGKILLed KILLS times (default 20) at random moments and
# restarted; every total and rated amount is then compared with a reference computed from the
# workload. Prints a JSON report (kills, events, mismatches — must be 0 —, recovery p50/p99).
#   scripts/crash-campaign.sh                     the full run (about 2-3 minutes)
#   KILLS=3 DURATION=15 scripts/crash-campaign.sh  the short form CI runs
#   MEMBERS=2 scripts/crash-campaign.sh           cluster mode: two members, each kill moves partitions
#   PARTITIONER=consistent_random MEMBERS=2 ...   Kafka producers on librdkafka's CRC32 default
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
source scripts/env.sh
cargo build --release --locked --bin tallyd >&2
source scripts/campaign-env.sh
scale=${SCALE:-1}
# A copy: a rebuild during the campaign must not swap the binary between two restarts.
bin_dir=$(mktemp -d)
cp "$CARGO_TARGET_DIR/release/tallyd" "$bin_dir/tallyd"
# (about 440 MB with debug info: removed at the end, whatever the outcome)
rc=0
python3 tests/campaign/crash.py --tallyd "$bin_dir/tallyd" --broker "$broker" \
  --kills "${KILLS:-20}" --duration "${DURATION:-90}" --members "${MEMBERS:-1}" \
  --partitioner "${PARTITIONER:-murmur2_random}" \
  --http-batches $((600 * scale)) --otlp-requests $((600 * scale)) --kafka-messages $((6000 * scale)) \
  || rc=$?
rm -rf "$bin_dir"
exit "$rc"
