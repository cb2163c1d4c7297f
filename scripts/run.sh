#!/usr/bin/env bash
# Runs the daemon on the embedded default config (no Kafka, no other service needed).
# Extra arguments go to tallyd, e.g. scripts/run.sh --log-level debug
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
source scripts/env.sh
exec cargo run --release --locked --bin tallyd -- run --config config/tallyd.toml "$@"
