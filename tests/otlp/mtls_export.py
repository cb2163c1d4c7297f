"""Exports with the real OpenTelemetry Python SDK exporters over TLS, with or without a client
certificate (mTLS).

For each transport (OTLP/gRPC, OTLP/HTTP) the same delta counter data (`http.server.requests`,
no tenant attribute: the certificate names the tenant) is exported once, trusting only the
server CA `--ca`; with `--cert NAME` the client presents NAME.crt / NAME.key. Prints each
export's result as JSON (`SUCCESS` / `FAILURE`); tests/otlp_ingest.rs checks them and the totals.

usage: mtls_export.py --grpc localhost:PORT --http localhost:PORT --ca FILE [--cert NAME] --value N
"""

import argparse
import json
import logging

import grpc
from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter as GrpcMetricExporter
from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter as HttpMetricExporter
from opentelemetry.sdk.metrics import Counter, MeterProvider
from opentelemetry.sdk.metrics.export import AggregationTemporality, InMemoryMetricReader
from opentelemetry.sdk.resources import Resource


def recorded(value):
    reader = InMemoryMetricReader(preferred_temporality={Counter: AggregationTemporality.DELTA})
    provider = MeterProvider(metric_readers=[reader], resource=Resource.create({"service.name": "mtls-test"}))
    provider.get_meter("tallyd-mtls").create_counter("http.server.requests").add(value, {"http.route": "/m"})
    data = reader.get_metrics_data()
    provider.shutdown()
    return data


def main():
    logging.basicConfig(level=logging.CRITICAL)
    parser = argparse.ArgumentParser()
    parser.add_argument("--grpc", required=True)
    parser.add_argument("--http", required=True)
    parser.add_argument("--ca", required=True)
    parser.add_argument("--cert")
    parser.add_argument("--value", type=int, required=True)
    args = parser.parse_args()
    with open(args.ca, "rb") as ca:
        root = ca.read()
    if args.cert:
        with open(args.cert + ".crt", "rb") as cert, open(args.cert + ".key", "rb") as key:
            credentials = grpc.ssl_channel_credentials(root, key.read(), cert.read())
        client_files = {"client_certificate_file": args.cert + ".crt", "client_key_file": args.cert + ".key"}
    else:
        credentials = grpc.ssl_channel_credentials(root)
        client_files = {}
    exporters = {
        "grpc": GrpcMetricExporter(endpoint=args.grpc, credentials=credentials, timeout=10),
        "http": HttpMetricExporter(
            endpoint=f"https://{args.http}/v1/metrics", certificate_file=args.ca, timeout=10, **client_files
        ),
    }
    results = {}
    for name, exporter in exporters.items():
        results[name] = exporter.export(recorded(args.value)).name
        exporter.shutdown()
    print(json.dumps(results))


if __name__ == "__main__":
    main()
