"""Exports a counter to tallyd over OTLP/gRPC and OTLP/HTTP with TLS, trusting only the test CA.

Prints the totals it recorded per tenant as JSON (tests/otlp_ingest.rs compares them).
usage: tls_export.py --grpc localhost:PORT --http localhost:PORT --ca FILE
"""

import argparse
import json

import grpc
from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter as GrpcMetricExporter
from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter as HttpMetricExporter
from opentelemetry.sdk.metrics import Counter, MeterProvider
from opentelemetry.sdk.metrics.export import AggregationTemporality, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource


def export(exporter, tenant, amounts):
    reader = PeriodicExportingMetricReader(exporter, export_interval_millis=3_600_000)
    provider = MeterProvider(resource=Resource.create({"tenant.id": tenant}), metric_readers=[reader])
    counter = provider.get_meter("tls").create_counter("http.server.requests")
    for amount in amounts:
        counter.add(amount, {"http.route": "/secure"})
    assert reader.force_flush(timeout_millis=10_000), f"{tenant}: export failed"
    provider.shutdown()
    return sum(amounts)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--grpc", required=True)
    parser.add_argument("--http", required=True)
    parser.add_argument("--ca", required=True)
    args = parser.parse_args()
    delta = {Counter: AggregationTemporality.DELTA}
    with open(args.ca, "rb") as ca:
        credentials = grpc.ssl_channel_credentials(root_certificates=ca.read())
    out = {
        "tls-grpc": export(
            GrpcMetricExporter(endpoint=args.grpc, credentials=credentials, preferred_temporality=delta),
            "tls-grpc",
            [3, 4, 5],
        ),
        "tls-http": export(
            HttpMetricExporter(
                endpoint=f"https://{args.http}/v1/metrics", certificate_file=args.ca, preferred_temporality=delta
            ),
            "tls-http",
            [7, 8],
        ),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
