"""Exports usage to tallyd with the real OpenTelemetry Python SDK and prints what it recorded.

For each transport (OTLP/gRPC, OTLP/HTTP) and each temporality (delta, cumulative) one tenant
records counters, up-down counters, gauges and histograms over several export rounds, and log
records (with one duplicate id). The script prints, as JSON, the totals it recorded per tenant;
the Rust test (tests/otlp_ingest.rs) compares them with tallyd's query API, exactly.

usage: sdk_export.py --grpc HOST:PORT --http HOST:PORT [--seed N]
"""

import argparse
import json
import logging
import random
import uuid
from decimal import Decimal

from opentelemetry.exporter.otlp.proto.grpc._log_exporter import OTLPLogExporter as GrpcLogExporter
from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter as GrpcMetricExporter
from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter as HttpLogExporter
from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter as HttpMetricExporter
from opentelemetry.sdk._logs import LoggerProvider, LoggingHandler
from opentelemetry.sdk._logs.export import SimpleLogRecordProcessor
from opentelemetry.sdk.metrics import Counter, Histogram, MeterProvider, UpDownCounter
from opentelemetry.sdk.metrics.export import AggregationTemporality, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource

ROUTES = ["/checkout", "/search"]


def metric_exporter(transport, address, temporality):
    preferred = None
    if temporality == "delta":
        preferred = {
            Counter: AggregationTemporality.DELTA,
            UpDownCounter: AggregationTemporality.DELTA,
            Histogram: AggregationTemporality.DELTA,
        }
    if transport == "grpc":
        return GrpcMetricExporter(endpoint=address, insecure=True, preferred_temporality=preferred)
    return HttpMetricExporter(endpoint=f"http://{address}/v1/metrics", preferred_temporality=preferred)


def record_metrics(transport, address, temporality, rng):
    tenant = f"{transport}-{temporality}"
    resource = Resource.create({"tenant.id": tenant, "service.name": "sdk-test"})
    reader = PeriodicExportingMetricReader(
        metric_exporter(transport, address, temporality), export_interval_millis=3_600_000
    )
    provider = MeterProvider(resource=resource, metric_readers=[reader])
    meter = provider.get_meter("usage")
    requests = meter.create_counter("http.server.requests")
    queue = meter.create_up_down_counter("queue.depth")
    storage = meter.create_gauge("storage.used")
    duration = meter.create_histogram("request.duration", unit="s")

    expected = {route: 0 for route in ROUTES}
    level = 0
    peak = None
    last_storage = None
    durations = []
    for _ in range(4):
        for _ in range(rng.randint(5, 30)):
            route = rng.choice(ROUTES)
            amount = rng.randint(1, 5)
            requests.add(amount, {"http.route": route})
            expected[route] += amount
        for _ in range(rng.randint(1, 6)):
            change = rng.randint(-3, 5)
            queue.add(change)
            level += change
        value = rng.randint(10, 500)
        storage.set(value)
        peak = value if peak is None else max(peak, value)
        last_storage = value
        for _ in range(rng.randint(1, 10)):
            # Multiples of 1/8 are exact in binary: the SDK's float sum is exact too.
            seconds = rng.randint(1, 40) / 8
            duration.record(seconds)
            durations.append(seconds)
        # One export per round: cumulative exports re-send growing totals.
        assert reader.force_flush(timeout_millis=10_000), "metrics export failed"
    provider.shutdown()
    totals = {
        "requests": expected,
        "queue_net": level,
        "storage_peak": peak,
        "storage_latest": last_storage,
        "request_count": len(durations),
        "request_seconds": str(sum(Decimal(str(d)) for d in durations)),
    }
    if temporality == "cumulative":
        # A cumulative up-down counter's value is the current level.
        totals["queue_level"] = level
    return tenant, totals


def record_logs(transport, address, rng):
    tenant = f"{transport}-logs"
    resource = Resource.create({"tenant.id": tenant, "service.name": "workflow-engine"})
    if transport == "grpc":
        exporter = GrpcLogExporter(endpoint=address, insecure=True)
    else:
        exporter = HttpLogExporter(endpoint=f"http://{address}/v1/logs")
    provider = LoggerProvider(resource=resource)
    provider.add_log_record_processor(SimpleLogRecordProcessor(exporter))
    handler = LoggingHandler(level=logging.INFO, logger_provider=provider)
    logger = logging.getLogger(f"workflows-{transport}")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    steps_total = 0
    runs = []
    for _ in range(rng.randint(5, 15)):
        run_id = str(uuid.UUID(int=rng.getrandbits(128)))
        steps = rng.randint(1, 20)
        runs.append((run_id, steps))
        steps_total += steps
        logger.info("workflow run", extra={"event.name": "workflow.run", "event.id": run_id, "steps": steps})
    # A producer retry: the same run again, which must not count twice.
    run_id, steps = runs[0]
    logger.info("workflow run", extra={"event.name": "workflow.run", "event.id": run_id, "steps": steps})
    # Not a metered event: accepted, not counted.
    logger.info("something else happened", extra={"event.name": "other"})
    assert provider.force_flush(timeout_millis=10_000), "logs export failed"
    provider.shutdown()
    logger.removeHandler(handler)
    return tenant, {"workflow_runs": steps_total, "runs": len(runs)}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--grpc", required=True)
    parser.add_argument("--http", required=True)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    out = {"metrics": {}, "logs": {}}
    for transport, address in (("grpc", args.grpc), ("http", args.http)):
        for temporality in ("delta", "cumulative"):
            tenant, totals = record_metrics(transport, address, temporality, rng)
            out["metrics"][tenant] = totals
        tenant, totals = record_logs(transport, address, rng)
        out["logs"][tenant] = totals
    print(json.dumps(out))


if __name__ == "__main__":
    main()
