#!/usr/bin/env bash
# Runs every Kloak test on this machine, as root. Installs what is missing first.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PATH:/usr/local/go/bin:$HOME/.cargo/bin"

if [ "$(id -u)" != 0 ]; then
  echo "scripts/test.sh: run as root; the data-path tests load BPF programs and stop processes" >&2
  exit 1
fi
scripts/install-deps.sh

cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings
# The end-to-end tests drive the real binary.
cargo build --workspace --locked
cargo test --workspace --locked
