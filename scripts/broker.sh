#!/usr/bin/env bash
# A real Kafka-protocol broker for the end-to-end tests: tansu (crates.io, Apache-2.0), in-memory
# storage, on loopback. Installs it once into the cargo bin directory (about 25-45 minutes on 2
# cores; skipped when present), then starts it and prints its address on stdout.
#   scripts/broker.sh start   → prints 127.0.0.1:PORT, writes the pid to $TALLYD_BROKER_DIR/pid
#   scripts/broker.sh stop
set -euo pipefail
dir="${TALLYD_BROKER_DIR:-${TMPDIR:-/tmp}/tallyd-broker}"
mkdir -p "$dir"
tansu="${CARGO_HOME:-$HOME/.cargo}/bin/tansu"

case "${1:-start}" in
  start)
    if ! [[ -x "$tansu" ]]; then
      echo "broker: installing tansu (once per machine; about 25-45 minutes)" >&2
      cargo install tansu --version 0.6.0 --locked --features dynostore \
        --target-dir "$HOME/.cache/tansu-target" >&2
    fi
    "$0" stop >/dev/null 2>&1 || true
    port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
    nohup "$tansu" broker --listener-url "tcp://127.0.0.1:$port" \
      --advertised-listener-url "tcp://127.0.0.1:$port" \
      --storage-engine memory://tansu/ >"$dir/log" 2>&1 &
    echo $! >"$dir/pid"
    for _ in $(seq 1 100); do
      if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
        echo "127.0.0.1:$port"
        exit 0
      fi
      sleep 0.1
    done
    echo "broker: tansu did not start; log: $dir/log" >&2
    cat "$dir/log" >&2
    exit 1
    ;;
  stop)
    if [[ -f "$dir/pid" ]]; then
      kill "$(cat "$dir/pid")" 2>/dev/null || true
      rm -f "$dir/pid"
    fi
    ;;
  *)
    echo "usage: $0 start|stop" >&2
    exit 64
    ;;
esac
