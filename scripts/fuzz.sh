#!/usr/bin/env bash
# Fuzzes every decoder of untrusted bytes (fuzz/fuzz_targets, entry points in src/fuzzing.rs)
# with cargo-fuzz (libFuzzer) on the nightly toolchain, FUZZ_SECONDS each (default 600), and
# prints per target: executions, corpus size, findings. A finding (a crash input) is copied to
# fuzz/regressions/<target>/ so that `tests/fuzz_corpus.rs` replays it on stable from then on.
#   scripts/fuzz.sh [TARGET...]      (default: every target)
# Needs: rustup's nightly toolchain and `cargo install cargo-fuzz` (installed here when missing).
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
seconds=${FUZZ_SECONDS:-600}
export CARGO_TARGET_DIR=${FUZZ_TARGET_DIR:-$HOME/.cache/tallyd-fuzz-target}
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  targets=($(sed -n 's/^name = "\(.*\)"$/\1/p' Cargo.toml | grep -v tallyd-fuzz))
fi
cargo +nightly fuzz build -O >&2
# The built binaries are run directly: `cargo fuzz run` would rebuild them (ASan, minutes) after
# any edit of src/ during a long campaign, and fuzz a moving target.
bin_dir="$CARGO_TARGET_DIR/$(rustc +nightly -vV | sed -n 's/^host: //p')/release"
printf '%-16s %12s %8s %9s\n' target executions corpus findings
for target in "${targets[@]}"; do
  log=$(mktemp)
  mkdir -p "corpus/$target" "regressions/$target"
  # A scratch copy of the corpus grows during the run; the committed seeds stay small.
  work=$(mktemp -d)
  cp "corpus/$target"/* "$work"/ 2>/dev/null || true
  mkdir -p "artifacts/$target"
  "$bin_dir/$target" "$work" -artifact_prefix="artifacts/$target/" -max_total_time="$seconds" \
    -rss_limit_mb=4096 -print_final_stats=1 >"$log" 2>&1 || true
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  findings=0
  for crash in artifacts/"$target"/crash-* artifacts/"$target"/oom-* artifacts/"$target"/timeout-*; do
    [ -e "$crash" ] || continue
    cp "$crash" "regressions/$target/"
    findings=$((findings + 1))
  done
  printf '%-16s %12s %8s %9s\n' "$target" "${execs:-?}" "$(ls "$work" | wc -l)" "$findings"
  [ "$findings" -eq 0 ] || tail -40 "$log" >&2
  rm -rf "$work" "$log"
done
