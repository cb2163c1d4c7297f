#!/usr/bin/env bash
# Runs every test: unit + property tests, black-box tests that start the real daemon (OTLP ones
# export with the OpenTelemetry Python SDK, installed here when missing), Kafka
# tests against librdkafka's in-process mock cluster, and end-to-end Kafka tests against a real
# broker (tansu) that this script installs when missing and starts on loopback.
# Everything builds in release so that RocksDB is compiled once for run, test, clippy and bench.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
source scripts/env.sh
# The OTLP tests export with the real OpenTelemetry Python SDK.
if ! python3 -c 'import opentelemetry.exporter.otlp.proto.grpc, opentelemetry.exporter.otlp.proto.http' 2>/dev/null; then
  echo "test: installing the OpenTelemetry Python SDK (tests/otlp/requirements.txt)" >&2
  python3 -m pip install -q --disable-pip-version-check -r tests/otlp/requirements.txt >&2
fi
# The protobuf schema test compiles proto/ with protoc from grpcio-tools.
if ! python3 -c 'import grpc_tools.protoc' 2>/dev/null; then
  echo "test: installing grpcio-tools (tests/otlp/requirements.txt)" >&2
  python3 -m pip install -q --disable-pip-version-check -r tests/otlp/requirements.txt >&2
fi
broker=$(scripts/broker.sh start)
trap 'scripts/broker.sh stop' EXIT
echo "test: tansu broker at $broker" >&2
# The broker tests must run here: their absence is a failure, not a skip.
export TALLYD_TEST_BROKER="$broker" TALLYD_REQUIRE_BROKER=1
cargo test --release --locked "$@"
