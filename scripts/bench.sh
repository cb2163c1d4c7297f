#!/usr/bin/env bash
# Runs every benchmark and rewrites the generated section of BENCHMARKS.md (between the
# `bench.sh:begin` / `bench.sh:end` markers) with the machine, commit, commands and figures,
# each beside the baseline measured in the same run. The hand-written analysis around it stays.
#   scripts/bench.sh            full run (about 40 minutes on 2 cores)
#   QUICK=1 scripts/bench.sh    short runs, to check the tooling (figures are marked QUICK)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
source scripts/env.sh
quick=${QUICK:-0}
if [[ "$quick" == 1 ]]; then
  duration=5; kafka_events=200000; rounds=1; criterion=(--warm-up-time 1 --measurement-time 2)
else
  duration=20; kafka_events=1000000; rounds=2; criterion=()
fi
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
log() { echo "bench.sh: $*" >&2; }

log "criterion: engine, checkpoint, rating (benches/aggregate.rs)"
cargo bench --locked --bench aggregate -- "${criterion[@]}" >"$out/aggregate.txt" 2>&1
log "criterion: Kafka consumer pipeline (benches/kafka_pipeline.rs)"
cargo bench --locked --bench kafka_pipeline -- "${criterion[@]}" >"$out/kafka_pipeline.txt" 2>&1
log "memory per active series (benches/memory.rs)"
if [[ "$quick" == 1 ]]; then sizes=(1000000); else sizes=(1000000 10000000); fi
cargo bench --locked --bench memory -- "${sizes[@]}" >"$out/memory.txt" 2>&1
log "HTTP end to end vs decode-only (scripts/bench-http.sh)"
DURATION=$duration scripts/bench-http.sh >"$out/http.txt" 2>&1
log "OTLP/gRPC end to end vs decode-and-discard (scripts/bench-otlp.sh)"
# 16 in flight: the OTLP path's peak needs more requests in flight than the loadgen's default 8
# (≈ 224 k vs ≈ 310-335 k points/s, BENCHMARKS.md, "OTLP ingest"); both servers get the same flags.
DURATION=$duration scripts/bench-otlp.sh --concurrency 16 >"$out/otlp.txt" 2>&1
log "Kafka end to end vs a bare consumer, $kafka_events events (scripts/bench-kafka.sh)"
scripts/bench-kafka.sh "$kafka_events" >"$out/kafka.txt" 2>&1
log "rating overhead (scripts/bench-rating.sh)"
DURATION=$duration ROUNDS=$rounds scripts/bench-rating.sh >"$out/rating.txt" 2>&1
log "event-to-queryable latency at half the peak (scripts/bench-latency.sh)"
DURATION=$duration PEAK_DURATION=$((duration / 2)) scripts/bench-latency.sh >"$out/latency.txt" 2>&1
log "recovery after SIGKILL (scripts/bench-recovery.sh)"
scripts/bench-recovery.sh "${sizes[@]}" >"$out/recovery.txt" 2>&1

python3 - "$out" "$CARGO_TARGET_DIR/criterion" "$quick" <<'PY'
import glob, json, os, platform, re, subprocess, sys
out, criterion, quick = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
read = lambda name: open(os.path.join(out, name)).read()

def criterion_rate(group, bench):
    base = os.path.join(criterion, group, *bench.split("/"), "new")
    est = json.load(open(os.path.join(base, "estimates.json")))
    meta = json.load(open(os.path.join(base, "benchmark.json")))
    elements = (meta.get("throughput") or {}).get("Elements")
    mean_s = est["mean"]["point_estimate"] / 1e9
    return (elements / mean_s if elements else None), mean_s

def fmt(rate):
    return "—" if rate is None else (f"{rate/1e6:.1f} M/s" if rate >= 1e6 else f"{rate/1e3:.0f} k/s")

rows = []
def row(what, result, baseline="", ratio="", command=""):
    rows.append(f"| {what} | {result} | {baseline} | {ratio} | `{command}` |")

def pair(group, bench, base_bench, what, command):
    try:
        rate, _ = criterion_rate(group, bench)
        base, _ = criterion_rate(group, base_bench)
        row(what, fmt(rate), f"{fmt(base)} ({base_bench})", f"{rate/base:.0%}", command)
    except (OSError, KeyError, TypeError, ZeroDivisionError) as error:
        row(what, f"not measured ({error})", command=command)

agg = "cargo bench --bench aggregate"
for group, label in (("hot_set_10k_zipf", "hot set, 10 k series"), ("random_1m_uniform", "1 M random series")):
    for bench in ("engine/1_threads", "engine/2_threads", "engine_pre_aggregated/2_threads"):
        pair(group, bench, "hashmap_baseline_1_thread", f"engine, {label}: {bench}", agg)
for changed in ("1000", "10000", "100000"):
    try:
        rate, mean_s = criterion_rate("checkpoint", f"changed_series/{changed}")
        row(f"checkpoint: {changed} changed series", f"{mean_s*1e3:.1f} ms ({mean_s/int(changed)*1e6:.2f} µs/series)", command=agg)
    except OSError:
        pass
for closing in ("1000", "10000"):
    try:
        pair("rating", f"rated/{closing}", f"unrated/{closing}", f"rating: checkpoint closing {closing} windows, rated", agg)
    except OSError:
        pass
kp = "cargo bench --bench kafka_pipeline"
# criterion turns the '/' of a function name into '_'.
pair("kafka_pipeline", "decode_aggregate_checkpoint_fold_threads=2", "decode_only_baseline", "Kafka pipeline, in-memory batches (vs serde_json parse)", kp)
pair("kafka_pipeline", "decode_aggregate_checkpoint_fold_threads=2", "tallyd_decode_only", "Kafka pipeline, in-memory batches (vs tallyd's decoder)", kp)
for line in read("memory.txt").splitlines():
    if "series" in line and "bytes" in line:
        row("memory", line.strip(), command="cargo bench --bench memory")
def ratio_line(text):
    m = re.search(r"# ratio tallyd / [^:]+: ([\d.]+%) \(([\d.]+) vs ([\d.]+)", text)
    return m.groups() if m else None
for name, script in (("http.txt", "scripts/bench-http.sh"), ("otlp.txt", "scripts/bench-otlp.sh --concurrency 16")):
    got = ratio_line(read(name))
    what = "HTTP end to end (batches of 500)" if name == "http.txt" else "OTLP/gRPC end to end (1 000 points/request)"
    if got:
        row(what, f"{float(got[1])/1e3:.0f} k/s", f"{float(got[2])/1e3:.0f} k/s (decode-only server)", got[0], script)
    else:
        row(what, "failed: see the script's output", command=script)
kafka = re.search(r'\{"tallyd_per_sec": (\d+), "baseline_per_sec": (\d+), "ratio": ([\d.]+)\}', read("kafka.txt"))
if kafka:
    t, b, r = kafka.groups()
    row("Kafka end to end (tansu)", f"{int(t)/1e3:.0f} k/s", f"{int(b)/1e3:.0f} k/s (bare consumer)", f"{float(r):.0%}", "scripts/bench-kafka.sh")
rating = re.search(r"# rated / unrated \(means\): ([\d.]+%)", read("rating.txt"))
rated = re.search(r"# events/s rated:\s+([\d ]+)", read("rating.txt"))
unrated = re.search(r"# events/s unrated:\s+([\d ]+)", read("rating.txt"))
if rating and rated and unrated:
    row("rating overhead (HTTP, 5 % late)", f"{float(rated.group(1).split()[0])/1e3:.0f} k/s rated", f"{float(unrated.group(1).split()[0])/1e3:.0f} k/s unrated", rating.group(1), "scripts/bench-rating.sh")
for m in re.finditer(r"# event-to-queryable (\w+): p50 ([\d.]+) ms, p99 ([\d.]+) ms.*? at (\d+)/s = 50 % of peak (\d+)/s.*?flush interval (\d+) ms", read("latency.txt")):
    protocol, p50, p99, rate, peak, flush = m.groups()
    row(f"event-to-queryable p50 / p99, {protocol} at 50 % of peak ({int(rate)/1e3:.0f} k/s)", f"{float(p50):.1f} / {float(p99):.1f} ms",
        f"2 × flush interval = {2*int(flush)} ms", f"{float(p99)/(2*int(flush)):.0%}", "scripts/bench-latency.sh")
for m in re.finditer(r"# recovery after SIGKILL \((\w+)\): (\d+) series: ([\d.]+) s to ready \(empty data dir: ([\d.]+) s\); replayed (\S+) log batches", read("recovery.txt")):
    state, series, secs, empty, replayed = m.groups()
    row(f"recovery after SIGKILL, {int(series)/1e6:g} M series, {state} ({replayed} log batches replayed)", f"{float(secs):.1f} s to ready",
        f"{float(empty):.2f} s (empty data dir)", f"{float(secs)/(int(series)/1e6):.1f} s per 1 M", "scripts/bench-recovery.sh")

commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True).stdout.strip()
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor())
mem = next((int(l.split()[1]) // 1024 // 1024 for l in open("/proc/meminfo") if l.startswith("MemTotal")), 0)
rustc = subprocess.run(["rustc", "--version"], capture_output=True, text=True).stdout.strip()
date = subprocess.run(["date", "-u", "+%Y-%m-%d %H:%M UTC"], capture_output=True, text=True).stdout.strip()
header = [
    "<!-- bench.sh:begin (generated by scripts/bench.sh; edits here are overwritten) -->",
    f"## Latest `scripts/bench.sh` run{' (QUICK: short runs, for checking the tooling)' if quick else ''}",
    "",
    f"{date}, commit `{commit}`{' + uncommitted changes' if dirty else ''}; {os.cpu_count()} vCPUs ({cpu}), {mem} GiB, {rustc}.",
    "",
    "| benchmark | result | baseline (same run) | ratio | command |",
    "|---|---|---|---|---|",
]
section = "\n".join(header + rows + ["", "<!-- bench.sh:end -->"])
text = open("BENCHMARKS.md").read()
begin, end = "<!-- bench.sh:begin", "<!-- bench.sh:end -->"
if begin in text:
    start = text.index(begin)
    stop = text.index(end) + len(end)
    text = text[:start] + section + text[stop:]
else:
    # After the introduction (first blank line after the title block).
    cut = text.index("\n## ")
    text = text[:cut] + "\n" + section + "\n" + text[cut:]
open("BENCHMARKS.md", "w").write(text)
print(section)
PY
