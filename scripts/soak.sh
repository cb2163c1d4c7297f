#!/usr/bin/env bash
# The soak (RELIABILITY.md): HTTP, OTLP/gRPC and Kafka at once for DURATION seconds (default
# 600) at half the machine's measured peak; tallyd's RSS, each source's request p99 and the
# Kafka lag sampled every 5 s, plotted to OUT/soak.png with the samples in OUT/soak.json
# (OUT default: benchmarks/soak). KAFKA_RATE (default 2000) events/s on the topic.
#   scripts/soak.sh                  the full run (about 11 minutes)
#   DURATION=60 scripts/soak.sh      a quick look
# The daemon's data dir (5-8 GB after ten minutes) is deleted at the end unless TALLYD_SOAK_KEEP=1.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
source scripts/env.sh
cargo build --release --locked --bin tallyd --bin tallyd-loadgen >&2
source scripts/campaign-env.sh
# Copies: a rebuild during the soak must not swap the binaries.
bin_dir=$(mktemp -d)
cp "$CARGO_TARGET_DIR/release/tallyd" "$CARGO_TARGET_DIR/release/tallyd-loadgen" "$bin_dir/"
rc=0
python3 tests/campaign/soak.py --bin-dir "$bin_dir" --broker "$broker" --duration "${DURATION:-600}" \
  --kafka-rate "${KAFKA_RATE:-2000}" --out "${OUT:-benchmarks/soak}" || rc=$?
rm -rf "$bin_dir"
exit "$rc"
