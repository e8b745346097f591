#!/usr/bin/env bash
# Data-path benchmark, as root: release build, then scripts/bench.py.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PATH:/usr/local/go/bin:$HOME/.cargo/bin"
[ "$(id -u)" = 0 ] || { echo "scripts/bench.sh: run as root" >&2; exit 1; }
scripts/install-deps.sh
command -v bpftool >/dev/null || { apt-get install -y -qq bpftool >/dev/null; }
cargo build --release -p kloak --locked
exec python3 scripts/bench.py
