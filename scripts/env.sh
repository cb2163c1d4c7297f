# Sourced by the scripts: one shared target dir outside the clone, so RocksDB's C++ (about 20
# minutes on 2 cores) is compiled once per machine and reused by every checkout and CI run.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/tallyd-target}"
mkdir -p "$CARGO_TARGET_DIR"
