"""Exports over a tenant's rate limit with the real OpenTelemetry Python SDK exporters.

For each transport, two delta exports of `http.server.requests` for tenant `acme` (whose plan
allows 10 a second): 10, then at once 5. The second is over the limit: tallyd answers
RESOURCE_EXHAUSTED with RetryInfo (gRPC) or 429 with Retry-After (HTTP), and the exporter
itself waits and retries. Prints per transport the two results and how long the second took.

usage: sdk_limits.py --grpc HOST:PORT --http HOST:PORT
"""

import argparse
import json
import logging
import time

from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter as GrpcMetricExporter
from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter as HttpMetricExporter
from opentelemetry.sdk.metrics import Counter, MeterProvider
from opentelemetry.sdk.metrics.export import AggregationTemporality, InMemoryMetricReader
from opentelemetry.sdk.resources import Resource


def recorded(value, route):
    reader = InMemoryMetricReader(preferred_temporality={Counter: AggregationTemporality.DELTA})
    provider = MeterProvider(metric_readers=[reader], resource=Resource.create({"tenant.id": "acme"}))
    provider.get_meter("tallyd-limits").create_counter("http.server.requests").add(value, {"http.route": route})
    data = reader.get_metrics_data()
    provider.shutdown()
    return data


def main():
    logging.basicConfig(level=logging.CRITICAL)
    parser = argparse.ArgumentParser()
    parser.add_argument("--grpc", required=True)
    parser.add_argument("--http", required=True)
    args = parser.parse_args()
    exporters = {
        "grpc": GrpcMetricExporter(endpoint=f"http://{args.grpc}", insecure=True, timeout=20),
        "http": HttpMetricExporter(endpoint=f"http://{args.http}/v1/metrics", timeout=20),
    }
    results = {}
    for name, exporter in exporters.items():
        time.sleep(1.2)  # the bucket is whole again
        first = exporter.export(recorded(10, f"/{name}/1")).name
        started = time.monotonic()
        second = exporter.export(recorded(5, f"/{name}/2")).name
        results[name] = {"first": first, "second": second, "second_secs": round(time.monotonic() - started, 2)}
        exporter.shutdown()
    print(json.dumps(results))


if __name__ == "__main__":
    main()
