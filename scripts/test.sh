#!/usr/bin/env bash
# Runs every test: unit + property tests and black-box tests that start the real daemon.
# Everything builds in release so that RocksDB is compiled once for run, test, clippy and bench.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
source scripts/env.sh
cargo test --release --locked "$@"
