#!/usr/bin/env bash
# Ingest with limits configured beside the same run without (issue 25: ≥ 95 %): one build, two
# configs that differ only in `[[plans.limits]]` (every event checked: rate limits and hard
# quotas on every additive meter the load generator feeds, set high enough that nothing is
# refused, a soft quota on the UNIQUE_COUNT one), alternated ROUNDS times by bench-ab.sh at a
# fixed RATE (daemon CPU per million events is the throughput measure) or closed loop (RATE=0).
# usage: PROTO=--url RATE=100000 ROUNDS=3 scripts/bench-limits-ingest.sh
source "$(dirname "${BASH_SOURCE[0]}")/bench-lib.sh"
plan() { # plan FILE: the embedded config with a `bench` plan as the default
  cat config/tallyd.toml > "$1"
  sed -i 's/^default_plan = "payg"/default_plan = "bench"/' "$1"
  printf '\n[[plans]]\nid = "bench"\ncurrency = "USD"\n' >> "$1"
}
plan "$dir/without.toml"
plan "$dir/with.toml"
limit() { printf '[[plans.limits]]\nmeter = "%s"\nkind = "%s"\nlimit = "%s"\n%s\n' "$@" >> "$dir/with.toml"; }
for meter in tokens api_calls requests; do
  limit "$meter" rate 1000000000000 'per = "second"'
  limit "$meter" quota 1000000000000000 'mode = "hard"'
done
limit mau quota 1000000000 'mode = "soft"'
mkdir -p "$dir/build"
cp "$bin/tallyd" "$dir/build/tallyd"
METRICS_GREP='^tallyd_(limit_decisions_total|ingest_events_total)' \
OLD_CONFIG="$dir/without.toml" NEW_CONFIG="$dir/with.toml" \
  scripts/bench-ab.sh "$dir/build" "$dir/build" "$@" | sed 's/^old/without limits/; s/^new/with limits/'
