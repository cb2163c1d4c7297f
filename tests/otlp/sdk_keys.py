"""Exports with the real OpenTelemetry Python SDK exporters, with and without an API key.

For each transport (OTLP/gRPC, OTLP/HTTP) the same delta counter data (`http.server.requests`,
no tenant attribute: the key names the tenant) is exported once without headers and once with
`authorization: Bearer KEY`; the script prints each export's result as JSON. The Rust test
(tests/otlp_ingest.rs) checks that only the keyed exports succeeded and were counted for the
key's tenant.

usage: sdk_keys.py --grpc HOST:PORT --http HOST:PORT --key KEY --value N
"""

import argparse
import json
import logging

from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter as GrpcMetricExporter
from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter as HttpMetricExporter
from opentelemetry.sdk.metrics import Counter, MeterProvider
from opentelemetry.sdk.metrics.export import AggregationTemporality, InMemoryMetricReader
from opentelemetry.sdk.resources import Resource


def recorded(value):
    reader = InMemoryMetricReader(preferred_temporality={Counter: AggregationTemporality.DELTA})
    provider = MeterProvider(metric_readers=[reader], resource=Resource.create({"service.name": "keys-test"}))
    provider.get_meter("tallyd-keys").create_counter("http.server.requests").add(value, {"http.route": "/k"})
    data = reader.get_metrics_data()
    provider.shutdown()
    return data


def main():
    logging.basicConfig(level=logging.CRITICAL)
    parser = argparse.ArgumentParser()
    parser.add_argument("--grpc", required=True)
    parser.add_argument("--http", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--value", type=int, required=True)
    args = parser.parse_args()
    headers = {"authorization": f"Bearer {args.key}"}
    exporters = {
        "grpc_without_key": GrpcMetricExporter(endpoint=f"http://{args.grpc}", insecure=True, timeout=10),
        "grpc_with_key": GrpcMetricExporter(endpoint=f"http://{args.grpc}", insecure=True, timeout=10, headers=headers),
        "http_without_key": HttpMetricExporter(endpoint=f"http://{args.http}/v1/metrics", timeout=10),
        "http_with_key": HttpMetricExporter(endpoint=f"http://{args.http}/v1/metrics", timeout=10, headers=headers),
    }
    results = {}
    for name, exporter in exporters.items():
        results[name] = exporter.export(recorded(args.value)).name
        exporter.shutdown()
    print(json.dumps(results))


if __name__ == "__main__":
    main()
