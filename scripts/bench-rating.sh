#!/usr/bin/env bash
# Rating overhead end to end: the same HTTP load against tallyd with every tenant on a plan (the
# embedded config's default plan, `payg`) and with no plan (the same config minus
# `default_plan`), alternated ROUNDS times so that drift on a shared machine hits both.
# Windows close during the run (allowed_lateness 60 s) and `--late-pct` events land in closed
# windows (2-4 minutes old), so every checkpoint rates closing windows and amendments.
# Usage: scripts/bench-rating.sh [loadgen flags...]   (DURATION=secs, ROUNDS=n, PORT=port)
source "$(dirname "$0")/bench-lib.sh"
port=${PORT:-18085}
grep -v '^default_plan' config/tallyd.toml >"$dir/unrated.toml"
cp config/tallyd.toml "$dir/rated.toml"

run() { # $1 = rated|unrated, $2 = round, then loadgen flags
  local kind=$1 round=$2
  shift 2
  CONFIG="$dir/$kind.toml" TALLYD__AGGREGATE__ALLOWED_LATENESS_SECS=60 \
    start_tallyd "$dir/data-$kind-$round" "$port"
  wait_ready "$port"
  echo "## $kind (round $round)" >&2
  "$bin/tallyd-loadgen" --url "http://127.0.0.1:$port" --duration-secs "${DURATION:-30}" \
    --late-pct 5 --json-out "$dir/$kind-$round.json" "$@" >&2
  curl -fsS "http://127.0.0.1:$port/metrics" \
    | grep -E '^tallyd_(rating_records_total|flush_duration_seconds_(sum|count))' >&2 || true
  kill "$pid"; wait "$pid" 2>/dev/null || true; pid=
}

for round in $(seq 1 "${ROUNDS:-2}"); do
  run unrated "$round" "$@"
  run rated "$round" "$@"
done
python3 - "$dir" "${ROUNDS:-2}" <<'PY'
import json, sys
d, rounds = sys.argv[1], int(sys.argv[2])
rate = lambda kind: [json.load(open(f"{d}/{kind}-{r}.json"))["events_per_sec"] for r in range(1, rounds + 1)]
rated, unrated = rate("rated"), rate("unrated")
print("# events/s unrated:", " ".join(f"{x:.0f}" for x in unrated))
print("# events/s rated:  ", " ".join(f"{x:.0f}" for x in rated))
print(f"# rated / unrated (means): {sum(rated) / sum(unrated):.1%}")
PY
