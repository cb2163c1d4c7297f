# Shared by the end-to-end bench scripts (sourced): build, readiness, starting the daemon.
# Sets $bin (release binaries) and $dir (a scratch directory removed on exit, with every
# daemon the script started).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/setup.sh
source scripts/env.sh
cargo build --release --locked --bins >&2
bin="$CARGO_TARGET_DIR/release"
dir=$(mktemp -d)
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$dir"' EXIT

# free_port: a loopback port nobody listens on now.
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# wait_ready PORT [TRIES]: until tallyd (or a baseline server) on PORT answers /readyz.
wait_ready() {
  for _ in $(seq 1 "${2:-100}"); do
    curl -fsS "http://127.0.0.1:$1/readyz" >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  echo "port $1 did not become ready" >&2
  return 1
}

# start_tallyd DATA_DIR HTTP_PORT [OTLP_GRPC_PORT]: the embedded config (or $CONFIG) on
# loopback, data in DATA_DIR, extra settings from the caller's TALLYD__* environment; sets $pid.
start_tallyd() {
  local data=$1 port=$2 grpc=${3:-}
  TALLYD__SERVER__HTTP_ADDR=127.0.0.1:$port \
  TALLYD__SERVER__OTLP_GRPC_ADDR=${grpc:+127.0.0.1:$grpc} \
  TALLYD__SERVER__OTLP_HTTP_ADDR= \
  TALLYD__LIMITS__GRPC_ADDR=${LIMITS_GRPC:+127.0.0.1:$LIMITS_GRPC} \
  TALLYD__STORAGE__DATA_DIR="$data" \
  TALLYD__EMIT__FILE__PATH="$data/usage.jsonl" \
  TALLYD__DEAD_LETTER__PATH="$data/dead-letter.jsonl" \
    "$bin/tallyd" run --config "${CONFIG:-config/tallyd.toml}" --log-level "${LOG_LEVEL:-warn}" 2>>"$dir/tallyd.log" &
  pid=$!
  pids+=("$pid")
}

# metric NAME PORT: the sum of a Prometheus counter's samples (all label sets).
metric() {
  curl -fsS "http://127.0.0.1:$2/metrics" | awk -v name="$1" '$1 == name || index($1, name "{") == 1 {s += $2} END {printf "%.0f\n", s}'
}
