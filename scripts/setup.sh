#!/usr/bin/env bash
# Installs what building tallyd needs on a fresh Debian/Ubuntu machine, and nothing when it is
# already there. RocksDB's bindings are generated with bindgen, which needs libclang; librdkafka is
# built from source by rdkafka-sys (make, a C++ compiler) and links the system OpenSSL for SSL/SASL_SSL.
set -euo pipefail

missing=()
for pkg in libclang-dev libssl-dev pkg-config make g++; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if ((${#missing[@]})); then
  if [[ $(id -u) -eq 0 ]]; then
    echo "setup: installing ${missing[*]}" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  elif command -v sudo >/dev/null; then
    echo "setup: installing ${missing[*]} with sudo" >&2
    sudo apt-get update -qq
    sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    echo "setup: missing ${missing[*]}; run as root: apt-get install -y ${missing[*]}" >&2
    exit 1
  fi
fi
command -v cargo >/dev/null || { echo "setup: cargo not found; install Rust from rustup" >&2; exit 1; }
