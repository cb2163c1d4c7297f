"""Crash campaign: a known workload over HTTP CloudEvents, OTLP/HTTP (metrics and logs) and a
Kafka topic, with duplicates and late events, while the daemon is SIGKILLed at random moments
(checkpoints every 200 ms, so many kills land inside one) and restarted. Clients retry until
acknowledged, as real ones do. At the end every total and every rated amount is compared with a
reference computed here, independently, from the workload. Run by scripts/crash-campaign.sh.

Prints a JSON report: kills, events sent and unique, mismatches (must be 0), recovery time
p50/p99 (from restart to /readyz 200)."""
import argparse
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from decimal import ROUND_HALF_UP, Decimal

TENANTS = [f"crash-t{i}" for i in range(8)]
# With --partitioner consistent_random (librdkafka's CRC32 default), Kafka usage goes to tenants
# of its own: a tenant that also reaches tallyd's edges (murmur2) would be split (issue 26).
KAFKA_ONLY_TENANTS = [f"crash-k{i}" for i in range(8)]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rfc3339(secs):
    return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(secs))


class Workload:
    """Every request the clients will send, and what they must add up to."""

    def __init__(self, seed, http_batches, otlp_requests, kafka_messages, now, kafka_only_tenants=False):
        rng = random.Random(seed)
        self.reference = {}  # (meter, tenant) -> total
        self.users = {}  # tenant -> set of users (mau)
        seen = set()
        ids = []

        def count(meter, tenant, value):
            self.reference[(meter, tenant)] = self.reference.get((meter, tenant), 0) + value

        kafka_ids = []

        def cloudevent(kind_rng, tenants=TENANTS, ids=ids):
            if ids and kind_rng.random() < 0.1:
                return dict(kind_rng.choice(ids))  # a duplicate (a client's retry, a replay)
            tenant = kind_rng.choice(tenants)
            # 5 % late: minutes ago, into windows that already closed (they are amended).
            at = now - (kind_rng.randint(180, 600) if kind_rng.random() < 0.05 else kind_rng.randint(0, 30))
            eid = f"ev-{len(ids)}-{kind_rng.getrandbits(32):08x}"
            kind = kind_rng.random()
            if kind < 0.5:
                tokens = kind_rng.randint(1, 1000)
                event = {"specversion": "1.0", "id": eid, "source": "crash", "type": "llm.prompt", "subject": tenant,
                         "time": rfc3339(at), "data": {"tokens": tokens, "model": f"m{kind_rng.randint(0, 3)}"}}
            elif kind < 0.9:
                event = {"specversion": "1.0", "id": eid, "source": "crash", "type": "api.request", "subject": tenant,
                         "time": rfc3339(at), "data": {"route": f"/r{kind_rng.randint(0, 4)}", "method": "POST"}}
            else:
                event = {"specversion": "1.0", "id": eid, "source": "crash", "type": "user.active", "subject": tenant,
                         "time": rfc3339(at), "data": {"user_id": f"u{kind_rng.randint(0, 40)}"}}
            ids.append(event)
            return event

        def account(event):
            key = (event["subject"], event["source"], event["id"])
            if key in seen:
                return
            seen.add(key)
            tenant = event["subject"]
            if event["type"] == "llm.prompt":
                count("tokens", tenant, event["data"]["tokens"])
            elif event["type"] == "api.request":
                count("api_calls", tenant, 1)
            else:
                self.users.setdefault(tenant, set()).add(event["data"]["user_id"])

        self.http = []
        for _ in range(http_batches):
            batch = [cloudevent(rng) for _ in range(50)]
            for event in batch:
                account(event)
            self.http.append(batch)
        self.kafka = []
        for _ in range(kafka_messages):
            event = cloudevent(rng, KAFKA_ONLY_TENANTS, kafka_ids) if kafka_only_tenants else cloudevent(rng)
            account(event)
            self.kafka.append(event)
        # OTLP: delta sums of `requests` per route and workflow.run log records; a tenth of the
        # requests are resent whole (an exporter's retry: counted once).
        self.otlp = []
        points = 0
        for i in range(otlp_requests):
            if self.otlp and rng.random() < 0.1:
                self.otlp.append(rng.choice(self.otlp))
                continue
            tenant = rng.choice(TENANTS)
            if rng.random() < 0.7:
                data_points = []
                for _ in range(rng.randint(1, 20)):
                    points += 1
                    value = rng.randint(1, 50)
                    end = (now - rng.randint(0, 30)) * 1_000_000_000 + points
                    data_points.append({"startTimeUnixNano": str(end - 1_000_000), "timeUnixNano": str(end),
                                        "asInt": str(value),
                                        "attributes": [{"key": "http.route", "value": {"stringValue": f"/r{rng.randint(0, 4)}"}}]})
                    count("requests", tenant, value)
                body = {"resourceMetrics": [{"resource": {"attributes": [{"key": "tenant.id", "value": {"stringValue": tenant}}]},
                                             "scopeMetrics": [{"metrics": [{"name": "http.server.requests", "sum": {
                                                 "aggregationTemporality": 1, "isMonotonic": True, "dataPoints": data_points}}]}]}]}
                self.otlp.append(("metrics", body))
            else:
                records = []
                for _ in range(rng.randint(1, 10)):
                    points += 1
                    steps = rng.randint(1, 9)
                    records.append({"timeUnixNano": str((now - rng.randint(0, 30)) * 1_000_000_000),
                                    "attributes": [{"key": "event.name", "value": {"stringValue": "workflow.run"}},
                                                   {"key": "event.id", "value": {"stringValue": f"run-{i}-{points}"}},
                                                   {"key": "steps", "value": {"intValue": str(steps)}}]})
                    count("workflow_runs", tenant, steps)
                body = {"resourceLogs": [{"resource": {"attributes": [{"key": "tenant.id", "value": {"stringValue": tenant}}]},
                                          "scopeLogs": [{"logRecords": records}]}]}
                self.otlp.append(("logs", body))
        for tenant, users in self.users.items():
            self.reference[("mau", tenant)] = len(users)
        self.sent_events = sum(len(b) for b in self.http) + len(self.kafka) + points
        self.unique_events = len(seen) + points


class Daemon:
    def __init__(self, binary, config, env, log):
        self.binary, self.config, self.env, self.log = binary, config, env, log
        self.process = None

    def start(self):
        self.process = subprocess.Popen([self.binary, "run", "--config", self.config, "--log-level",
                                         os.environ.get("TALLYD_CAMPAIGN_LOG", "warn")],
                                        env=self.env, stdout=subprocess.DEVNULL, stderr=self.log)
        started = time.monotonic()
        while time.monotonic() - started < 120:
            if self.process.poll() is not None:
                raise RuntimeError(f"tallyd exited with {self.process.returncode}")
            try:
                with urllib.request.urlopen(f"http://{self.env['TALLYD__SERVER__HTTP_ADDR']}/readyz", timeout=1) as r:
                    if r.status == 200:
                        return time.monotonic() - started
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            time.sleep(0.02)
        raise RuntimeError("tallyd did not become ready")

    def kill(self):
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def stop(self):
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(timeout=60)


def post_until_acknowledged(urls, body, content_type, stop):
    """POSTs to one of `urls` (the members' edges), the next one after each failure."""
    data = json.dumps(body).encode()
    attempt = random.randrange(len(urls))
    while not stop.is_set():
        url = urls[attempt % len(urls)]
        attempt += 1
        request = urllib.request.Request(url, data=data, method="POST", headers={"content-type": content_type})
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                if response.status in (200, 202):
                    return
        except urllib.error.HTTPError as error:
            if error.code not in (503,):
                raise RuntimeError(f"{url}: HTTP {error.code}: {error.read()[:300]}")
        except (urllib.error.URLError, ConnectionError, OSError, TimeoutError):
            pass  # down (killed): retry until the restart takes it
        time.sleep(0.05)


def get_json(url):
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def totals(http_addrs):
    """(meter, tenant) -> total, from the query API. In cluster mode a query that names no
    subject answers the rows of the member's own partitions: the members' answers are joined,
    and a tenant answered by two members (a rebalance in flight) means: ask again."""
    out = {}
    for meter in ["tokens", "api_calls", "mau", "requests", "workflow_runs"]:
        answered_by = {}
        for member, http_addr in enumerate(http_addrs):
            answer = get_json(f"http://{http_addr}/api/v1/meters/{meter}/query")
            for row in answer["data"]:
                if row["subject"].startswith("crash-"):
                    key = (meter, row["subject"])
                    if answered_by.setdefault(key, member) != member:
                        raise ConnectionError(f"{key} answered by two members")
                    out[key] = out.get(key, 0) + int(Decimal(str(row["value"])))
    return out


def price(meter, quantity):
    """The seed plan `payg` (config/tallyd.toml), computed independently."""
    if meter == "api_calls":
        exact = Decimal(quantity) * Decimal("0.001")
    elif meter == "tokens":
        exact = Decimal(min(quantity, 1_000_000)) * Decimal("0.00002") + Decimal(max(quantity - 1_000_000, 0)) * Decimal("0.00001")
    elif meter == "mau":
        exact = Decimal(max(quantity - 5, 0)) * Decimal("5")
    else:
        return None
    return exact.quantize(Decimal("0.01"), rounding=ROUND_HALF_UP)


def rated_amounts(http_addrs):
    """(meter, tenant) -> amount: the latest revision of each rated record over every member
    (a record's windows may have been rated by the member that owned its tenant then)."""
    latest = {}
    for http_addr in http_addrs:
        answer = get_json(f"http://{http_addr}/api/v1/rated?limit=10000")
        for record in answer["data"]:
            if record["tenant"].startswith("crash-") and record["meter"]:
                known = latest.get(record["record_id"])
                if known is None or record["revision"] > known["revision"]:
                    latest[record["record_id"]] = record
    out = {}
    for record in latest.values():
        key = (record["meter"], record["tenant"])
        out[key] = out.get(key, Decimal(0)) + Decimal(record["amount"])
    return out


# What a record says; `closed_at` / `rated_at` may differ between identical re-emissions.
RECORD_SUBSTANCE = ("quantity", "amount", "period_quantity", "period_amount", "increment")


def record_conflicts(work):
    """(record ids with two different substances at one revision, lines read) over every
    member's usage file: one owner per partition at a time means a revision is computed once."""
    seen, lines = {}, 0
    for name in sorted(os.listdir(work)):
        path = os.path.join(work, name, "usage.jsonl")
        if not name.startswith("data-") or not os.path.exists(path):
            continue
        with open(path, errors="replace") as usage:
            for line in usage:
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                lines += 1
                key = (record.get("kind"), record.get("record_id"), record.get("revision"))
                seen.setdefault(key, set()).add(tuple(str(record.get(f)) for f in RECORD_SUBSTANCE))
    return sum(1 for substances in seen.values() if len(substances) > 1), lines


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tallyd", required=True)
    parser.add_argument("--broker", required=True)
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--duration", type=float, default=90, help="seconds the clients spread the workload over")
    parser.add_argument("--http-batches", type=int, default=600)
    parser.add_argument("--otlp-requests", type=int, default=600)
    parser.add_argument("--kafka-messages", type=int, default=6000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--partitioner", default="murmur2_random",
                        help="the Kafka producer's partitioner; consistent_random (librdkafka's CRC32 default) "
                             "sends Kafka usage to Kafka-only tenants")
    parser.add_argument("--members", type=int, default=1,
                        help="1: single mode; more: cluster mode (members share the topic, edges forward, "
                             "each kill moves partitions)")
    args = parser.parse_args()
    from confluent_kafka import Producer
    from confluent_kafka.admin import AdminClient, NewTopic

    now = int(time.time())
    workload = Workload(args.seed, args.http_batches, args.otlp_requests, args.kafka_messages, now,
                        kafka_only_tenants=args.partitioner != "murmur2_random")
    topic = f"crash-usage-{args.seed}-{now}"
    admin = AdminClient({"bootstrap.servers": args.broker})
    for future in admin.create_topics([NewTopic(topic, num_partitions=4, replication_factor=1)]).values():
        future.result(30)
    work = tempfile.mkdtemp(prefix="tallyd-crash-")
    config = os.path.join(work, "tallyd.toml")
    with open("config/tallyd.toml") as default, open(config, "w") as out:
        text = default.read()
        text = text.replace("allowed_lateness_secs = 300", "allowed_lateness_secs = 1")
        text = text.replace("flush_interval_ms = 1000", "flush_interval_ms = 200")
        text = text.replace("ingest_log_segment_bytes = 67108864", "ingest_log_segment_bytes = 1048576")
        out.write(text)
        out.write(f'\n[kafka]\nbrokers = "{args.broker}"\ntopics = ["{topic}"]\ngroup_id = "{topic}"\n')
        if args.members > 1:
            out.write(f'dlq_topic = "{topic}.dlq"\n[cluster]\nmode = "kafka"\n'
                      'secret = "crash-campaign-cluster-secret-0123456789"\n')
        # A killed member's partitions move once its session times out: 6 s, not 45.
        out.write('[kafka.properties]\n"batch.num.messages" = "1"\n"session.timeout.ms" = "6000"\n'
                  '"heartbeat.interval.ms" = "1000"\n')
    daemons = []
    for member in range(args.members):
        data = os.path.join(work, f"data-{member}")
        env = dict(os.environ, TALLYD__SERVER__HTTP_ADDR=f"127.0.0.1:{free_port()}",
                   TALLYD__SERVER__OTLP_HTTP_ADDR=f"127.0.0.1:{free_port()}",
                   TALLYD__SERVER__OTLP_GRPC_ADDR="", TALLYD__LIMITS__GRPC_ADDR="",
                   TALLYD__STORAGE__DATA_DIR=data,
                   TALLYD__EMIT__FILE__PATH=os.path.join(data, "usage.jsonl"),
                   TALLYD__DEAD_LETTER__PATH=os.path.join(data, "dead-letter.jsonl"))
        daemons.append(Daemon(args.tallyd, config, env, open(os.path.join(work, f"tallyd-{member}.log"), "ab")))
    https = [d.env["TALLYD__SERVER__HTTP_ADDR"] for d in daemons]
    otlps = [d.env["TALLYD__SERVER__OTLP_HTTP_ADDR"] for d in daemons]
    http = https[0]
    recoveries = [d.start() for d in daemons]
    stop = threading.Event()
    errors = []

    def paced(items, send):
        try:
            pause = args.duration / max(len(items), 1)
            for item in items:
                send(item)
                time.sleep(pause)
        except Exception as error:  # noqa: BLE001 - reported, fails the campaign
            errors.append(repr(error))

    # murmur2: the partitioner tallyd's own edges use, so each tenant's Kafka and forwarded HTTP
    # events meet on one partition (librdkafka's default, CRC32, would split a tenant that also
    # posts to the edges: with it, Kafka usage has tenants of its own; queries find them by
    # what the members learned, issue 26).
    producer = Producer({"bootstrap.servers": args.broker, "enable.idempotence": True, "acks": "all",
                         "batch.num.messages": 1, "linger.ms": 0, "partitioner": args.partitioner})

    def produce(event):
        producer.produce(topic, key=event["subject"], value=json.dumps(event).encode())
        producer.poll(0)

    senders = [
        threading.Thread(target=paced, args=(workload.http, lambda batch: post_until_acknowledged(
            [f"http://{h}/api/v1/events" for h in https], batch, "application/cloudevents-batch+json", stop))),
        threading.Thread(target=paced, args=(workload.otlp, lambda request: post_until_acknowledged(
            [f"http://{o}/v1/{request[0]}" for o in otlps], request[1], "application/json", stop))),
        threading.Thread(target=paced, args=(workload.kafka, produce)),
    ]
    for sender in senders:
        sender.start()
    rng = random.Random(args.seed + 1)
    kills = 0
    while kills < args.kills:
        time.sleep(rng.uniform(0.2, 2 * args.duration / args.kills))
        daemon = rng.choice(daemons)
        daemon.kill()
        kills += 1
        recoveries.append(daemon.start())
    for sender in senders:
        sender.join()
    producer.flush(60)
    # Everything acknowledged and produced: wait until the totals settle, then compare.
    deadline = time.monotonic() + 180
    mismatches = []
    while True:
        try:
            got = totals(https)
        except (urllib.error.URLError, ConnectionError, OSError):
            got = {}  # 503 while a member restores moved partitions: ask again
        mismatches = [(key, want, got.get(key, 0)) for key, want in sorted(workload.reference.items())
                      if got.get(key, 0) != want]
        extra = [key for key in got if key not in workload.reference]
        if (not mismatches and not extra) or time.monotonic() > deadline:
            mismatches += [(key, 0, got[key]) for key in extra]
            break
        time.sleep(1)
    rated_mismatches = []
    while True:
        rated = rated_amounts(https)
        rated_mismatches = []
        for (meter, tenant), quantity in sorted(workload.reference.items()):
            want = price(meter, quantity)
            if want is not None and rated.get((meter, tenant), Decimal(0)) != want:
                rated_mismatches.append(((meter, tenant), str(want), str(rated.get((meter, tenant), Decimal(0)))))
        if not rated_mismatches or time.monotonic() > deadline + 120:
            break
        time.sleep(2)
    with urllib.request.urlopen(f"http://{http}/metrics", timeout=10) as response:
        metrics = response.read().decode()
    counters = {}
    for line in metrics.splitlines():
        if line.startswith(("tallyd_ingest_events_total", "tallyd_kafka_messages_total", "tallyd_kafka_offset_gaps_total",
                            "tallyd_kafka_consumer_lag", "tallyd_ingest_refused_total",
                            "tallyd_changelog_restores_total", "tallyd_changelog_reemitted_records_total",
                            "tallyd_changelog_deposed_total")):
            name, value = line.rsplit(" ", 1)
            counters[name] = value
    for daemon in daemons:
        daemon.stop()
    restarts = sorted(recoveries[args.members:]) or [0]
    report = {
        "members": args.members,
        "kills": kills,
        "events_sent": workload.sent_events,
        "events_unique": workload.unique_events,
        "http_batches": len(workload.http),
        "otlp_requests": len(workload.otlp),
        "kafka_messages": len(workload.kafka),
        "totals_compared": len(workload.reference),
        "total_mismatches": len(mismatches),
        "rated_mismatches": len(rated_mismatches),
        "recovery_p50_s": round(statistics.median(restarts), 3),
        "recovery_p99_s": round(restarts[min(len(restarts) - 1, int(len(restarts) * 0.99))], 3),
        "client_errors": errors,
        "metrics_after_the_last_restart": counters,
        # Every incarnation's warnings: how often the orphan watch had to rejoin the group.
        # Reported, not failed on: RELIABILITY.md, cluster finding (6), open.
        "record_revisions_with_two_contents": record_conflicts(work)[0],
        "orphan_rejoins": sum(open(os.path.join(work, name), errors="replace").read().count("rejoining the group")
                              for name in os.listdir(work) if name.endswith(".log")),
        "work_dir": work,
    }
    if mismatches or rated_mismatches:
        report["mismatch_examples"] = [str(m) for m in (mismatches + rated_mismatches)[:40]]
    print(json.dumps(report, indent=1))
    sys.exit(0 if not mismatches and not rated_mismatches and not errors else 1)


if __name__ == "__main__":
    main()
