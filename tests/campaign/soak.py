"""Soak: every source at once for --duration seconds at half the machine's measured peak, with
tallyd's RSS, each source's request p99 and the Kafka consumer lag sampled over time, plotted
(PNG) and summarised (JSON). Run by scripts/soak.sh.

Load: the HTTP (CloudEvents batches of 500) and OTLP/gRPC (1,000 points) peaks are measured
first, each alone in a 10 s closed loop; the soak then runs both open loop at a quarter of their
own peak (together: half the machine) plus Kafka at --kafka-rate events/s (one CloudEvent per
message) into a 4-partition topic. Flat means: the last minute's RSS and p99 are not trending
away from the first minute's after warm-up."""
import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mib(pid):
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def metric_sum(text, name):
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


def wait_ready(http):
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://{http}/readyz", timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError("tallyd did not become ready")


def loadgen(bin_dir, flags, out=None):
    command = [os.path.join(bin_dir, "tallyd-loadgen"), *flags]
    if out:
        command += ["--json-out", out]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def read_lines(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def window_mean(samples, key, start, end):
    values = [s[key] for s in samples if start <= s["t_secs"] < end]
    return sum(values) / len(values) if values else float("nan")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--bin-dir", required=True)
    parser.add_argument("--broker", required=True)
    parser.add_argument("--duration", type=int, default=600)
    parser.add_argument("--kafka-rate", type=int, default=2000)
    parser.add_argument("--out", required=True, help="directory for soak.png and soak.json")
    args = parser.parse_args()
    from confluent_kafka.admin import AdminClient, NewTopic

    os.makedirs(args.out, exist_ok=True)
    work = tempfile.mkdtemp(prefix="tallyd-soak-")
    topic = f"soak-{int(time.time())}"
    admin = AdminClient({"bootstrap.servers": args.broker})
    for future in admin.create_topics([NewTopic(topic, num_partitions=4, replication_factor=1)]).values():
        future.result(30)
    http, grpc = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    config = os.path.join(work, "tallyd.toml")
    with open("config/tallyd.toml") as default, open(config, "w") as out:
        out.write(default.read())
        out.write(f'\n[kafka]\nbrokers = "{args.broker}"\ntopics = ["{topic}"]\ngroup_id = "{topic}"\n'
                  '[kafka.properties]\n"session.timeout.ms" = "6000"\n')
    env = dict(os.environ, TALLYD__SERVER__HTTP_ADDR=http, TALLYD__SERVER__OTLP_GRPC_ADDR=grpc,
               TALLYD__SERVER__OTLP_HTTP_ADDR="", TALLYD__LIMITS__GRPC_ADDR="",
               TALLYD__STORAGE__DATA_DIR=os.path.join(work, "data"),
               TALLYD__EMIT__FILE__PATH=os.path.join(work, "data/usage.jsonl"),
               TALLYD__DEAD_LETTER__PATH=os.path.join(work, "data/dead-letter.jsonl"))
    log = open(os.path.join(work, "tallyd.log"), "wb")
    daemon = subprocess.Popen([os.path.join(args.bin_dir, "tallyd"), "run", "--config", config,
                               "--log-level", "warn"], env=env, stdout=subprocess.DEVNULL, stderr=log)
    try:
        wait_ready(http)
        url = f"http://{http}"
        http_flags = ["--url", url, "--batch-size", "500"]
        otlp_flags = ["--url", url, "--otlp-grpc", grpc, "--batch-size", "1000"]
        peaks = {}
        for name, flags in (("http", http_flags), ("otlp", otlp_flags)):
            path = os.path.join(work, f"{name}-peak.json")
            loadgen(args.bin_dir, [*flags, "--concurrency", "8", "--duration-secs", "10"], path).wait()
            with open(path) as f:
                peaks[name] = json.load(f)["events_per_sec"]
        rates = {name: int(peak / 4) for name, peak in peaks.items()}
        rates["kafka"] = args.kafka_rate
        print(f"soak: peaks {peaks}; soaking at {rates} events/s for {args.duration} s", file=sys.stderr)

        intervals = {name: os.path.join(work, f"{name}-intervals.jsonl") for name in rates}
        common = ["--duration-secs", str(args.duration), "--interval-secs", "5"]
        gens = {
            "http": loadgen(args.bin_dir, [*http_flags, *common, "--concurrency", "32", "--rate", str(rates["http"]),
                                           "--seed", "7", "--intervals-out", intervals["http"]],
                            os.path.join(work, "http-soak.json")),
            "otlp": loadgen(args.bin_dir, [*otlp_flags, *common, "--concurrency", "32", "--rate", str(rates["otlp"]),
                                           "--seed", "8", "--intervals-out", intervals["otlp"]],
                            os.path.join(work, "otlp-soak.json")),
            "kafka": loadgen(args.bin_dir, ["--kafka-produce", args.broker, "--kafka-topic", topic, "--rate",
                                            str(rates["kafka"]), "--events", str(rates["kafka"] * args.duration),
                                            "--duration-secs", str(args.duration),
                                            "--batch-size", "100", "--seed", "9"]),
        }
        samples = []
        started = time.monotonic()
        while any(gen.poll() is None for gen in gens.values()):
            time.sleep(5)
            try:
                with urllib.request.urlopen(f"{url}/metrics", timeout=5) as response:
                    text = response.read().decode()
            except OSError:
                text = ""
            samples.append({
                "t_secs": round(time.monotonic() - started),
                "rss_mib": round(rss_mib(daemon.pid), 1),
                "kafka_lag": metric_sum(text, "tallyd_kafka_consumer_lag"),
                "kafka_events": sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                                    if line.startswith('tallyd_ingest_events_total{source="kafka"')),
            })
        if daemon.poll() is not None:
            raise RuntimeError(f"tallyd exited with {daemon.returncode} during the soak")
        per_source = {name: read_lines(path) for name, path in intervals.items()}
    finally:
        daemon.terminate()
        daemon.wait(timeout=60)

    duration = args.duration
    warm = 60  # the first minute: allocators and caches fill
    summary = {
        "duration_secs": duration,
        "peaks_events_per_sec": {k: round(v) for k, v in peaks.items()},
        "rates_events_per_sec": rates,
        "rss_mib": {
            "after_warmup_minute": round(window_mean(samples, "rss_mib", warm, warm + 60), 1),
            "last_minute": round(window_mean(samples, "rss_mib", duration - 60, duration + 60), 1),
            "max": max(s["rss_mib"] for s in samples),
        },
        "kafka_lag_max": max(s["kafka_lag"] for s in samples),
        "kafka_lag_last_minute_mean": round(window_mean(samples, "kafka_lag", duration - 60, duration + 60), 1),
    }
    for name, lines in per_source.items():
        if not lines:
            continue
        summary[name] = {
            "events": sum(line["events"] for line in lines),
            "errors": sum(line["errors"] for line in lines),
            "p99_ms_after_warmup_minute": round(window_mean(lines, "p99_ms", warm, warm + 60), 1),
            "p99_ms_last_minute": round(window_mean(lines, "p99_ms", duration - 60, duration + 60), 1),
            "p99_ms_max_interval": max(line["p99_ms"] for line in lines),
        }
    summary["kafka"] = {"produced_target": rates["kafka"] * duration,
                        "counted_by_tallyd": samples[-1]["kafka_events"] if samples else 0}

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, axes = plt.subplots(3, 1, figsize=(10, 10), sharex=True)
    axes[0].plot([s["t_secs"] for s in samples], [s["rss_mib"] for s in samples], color="tab:blue")
    axes[0].set_ylabel("tallyd RSS (MiB)")
    axes[0].set_ylim(bottom=0)
    for name, lines in per_source.items():
        if lines:
            axes[1].plot([l["t_secs"] for l in lines], [l["p99_ms"] for l in lines], label=f"{name} request p99")
    axes[1].set_ylabel("p99 per 5 s (ms)")
    axes[1].set_ylim(bottom=0)
    axes[1].legend()
    for name, lines in per_source.items():
        if lines:
            axes[2].plot([l["t_secs"] for l in lines], [l["events"] / 5 for l in lines], label=f"{name} events/s acked")
    axes[2].plot([s["t_secs"] for s in samples], [s["kafka_lag"] for s in samples], label="Kafka consumer lag (messages)")
    axes[2].set_ylabel("events/s, lag")
    axes[2].set_xlabel("seconds")
    axes[2].legend()
    figure.suptitle(f"tallyd soak: HTTP {rates['http']}/s + OTLP {rates['otlp']}/s + Kafka {rates['kafka']}/s "
                    f"for {duration} s (2 cores)")
    figure.tight_layout()
    figure.savefig(os.path.join(args.out, "soak.png"), dpi=80)
    with open(os.path.join(args.out, "soak.json"), "w") as f:
        json.dump({"summary": summary, "samples": samples, "intervals": per_source}, f)
    print(json.dumps(summary, indent=1))
    # Ten minutes at these rates leave 5-8 GB of store behind: kept only when asked.
    if os.environ.get("TALLYD_SOAK_KEEP") != "1":
        import shutil
        shutil.rmtree(work, ignore_errors=True)
    errors = sum(summary.get(name, {}).get("errors", 0) for name in ("http", "otlp"))
    sys.exit(0 if errors == 0 else 1)


if __name__ == "__main__":
    main()
