"""Usage-to-signal latency: for each of N tenants (each with a hard quota of 100 tokens on the
default plan), open a tallyd.quota.v1 Watch stream, post 85 tokens over HTTP, and time from the
202 to the Watch message that says `warning` (80 % crossed), then ask RLS for 20 tokens' hits
after posting 15 more, timing from that 202 to the OVER_LIMIT answer. Negative times: the
message arrived before the client had read its 202. With KAFKA_BROKERS and SIGNAL_TOPIC set,
also times from that second 202 to the signal topic's `exceeded` record for the tenant (a
confluent-kafka consumer reading the topic from its end). Prints the distributions as JSON.

usage: [KAFKA_BROKERS=host:port SIGNAL_TOPIC=t] signal_latency.py STUBS_DIR GRPC_ADDR HTTP_ADDR N
"""

import os

import json
import statistics
import sys
import threading
import time
import urllib.request

import grpc


def percentile(values, p):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def main():
    stubs, grpc_addr, http_addr, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    sys.path.insert(0, stubs)
    from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
    from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc
    from tallyd.quota.v1 import quota_pb2, quota_pb2_grpc

    channel = grpc.insecure_channel(grpc_addr)
    quota = quota_pb2_grpc.QuotaStub(channel)
    rls = rls_pb2_grpc.RateLimitServiceStub(channel)

    def post(tenant, event_id, tokens):
        event = {"specversion": "1.0", "id": event_id, "source": "latency", "type": "llm.prompt",
                 "subject": tenant, "data": {"tokens": tokens, "model": "m"}}
        request = urllib.request.Request(f"http://{http_addr}/api/v1/events", data=json.dumps(event).encode(),
                                         headers={"content-type": "application/cloudevents+json"})
        with urllib.request.urlopen(request, timeout=10) as response:
            response.read()
        return time.monotonic()

    # Signal topic records by key, with their arrival times (the consumer's thread).
    topic_arrivals = {}
    brokers, topic = os.environ.get("KAFKA_BROKERS"), os.environ.get("SIGNAL_TOPIC")
    if brokers and topic:
        from confluent_kafka import Consumer, TopicPartition, OFFSET_END
        consumer = Consumer({"bootstrap.servers": brokers, "group.id": f"latency-{time.time_ns()}",
                             "enable.auto.commit": False, "fetch.wait.max.ms": 1})
        consumer.assign([TopicPartition(topic, 0, OFFSET_END)])
        consumer.poll(1.0)

        def consume():
            while True:
                message = consumer.poll(0.05)
                if message is None or message.error():
                    continue
                value = json.loads(message.value())
                if value.get("state") == "exceeded":
                    topic_arrivals.setdefault(message.key().decode(), time.monotonic())

        threading.Thread(target=consume, daemon=True).start()
    watch_ms, rls_ms, topic_ms = [], [], []
    for i in range(n):
        tenant = f"latency-{i}-{time.time_ns()}"
        arrivals = []
        ready = threading.Event()
        stream = quota.Watch(quota_pb2.WatchRequest(tenant=tenant))

        def read():
            try:
                for state in stream:
                    if state.meter == "tokens":
                        ready.set()
                    if state.state == "warning":
                        arrivals.append(time.monotonic())
            except grpc.RpcError:
                pass

        threading.Thread(target=read, daemon=True).start()
        ready.wait(5)
        sent = post(tenant, f"{tenant}-a", 85)
        deadline = time.monotonic() + 5
        while not arrivals and time.monotonic() < deadline:
            time.sleep(0.0002)
        if arrivals:
            watch_ms.append((arrivals[0] - sent) * 1000)
        stream.cancel()
        sent = post(tenant, f"{tenant}-b", 15)
        descriptor = ratelimit_pb2.RateLimitDescriptor(entries=[
            ratelimit_pb2.RateLimitDescriptor.Entry(key="tenant", value=tenant),
            ratelimit_pb2.RateLimitDescriptor.Entry(key="meter", value="tokens")])
        answer = rls.ShouldRateLimit(rls_pb2.RateLimitRequest(domain="tallyd", descriptors=[descriptor]), timeout=5)
        if answer.overall_code == rls_pb2.RateLimitResponse.OVER_LIMIT:
            rls_ms.append((time.monotonic() - sent) * 1000)
        if brokers and topic:
            key = f"{tenant}/tokens/quota"
            deadline = time.monotonic() + 5
            while key not in topic_arrivals and time.monotonic() < deadline:
                time.sleep(0.0002)
            if key in topic_arrivals:
                topic_ms.append((topic_arrivals[key] - sent) * 1000)

    def summary(values):
        if not values:
            return None
        return {"n": len(values), "p50_ms": round(percentile(values, 50), 3), "p99_ms": round(percentile(values, 99), 3),
                "max_ms": round(max(values), 3), "mean_ms": round(statistics.mean(values), 3)}

    print(json.dumps({"watch_after_202": summary(watch_ms), "rls_over_limit_after_202": summary(rls_ms),
                      "signal_topic_after_202": summary(topic_ms) if brokers and topic else None}))


if __name__ == "__main__":
    main()
