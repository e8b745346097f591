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
# kube-apiserver and etcd for the Kubernetes tests, built once with the
# machine's Go and cached under ~/.cache/kloak (several minutes cold).
e2e/k8s-tools/build.sh >/dev/null
# Jaeger for the observability tests, likewise (~5 minutes cold).
e2e/otel-tools/build.sh >/dev/null

cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings
# The end-to-end tests drive the real binary.
cargo build --workspace --locked
log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
cargo test --workspace --locked 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
# One closing line over every test binary, so the total is what a reader (or CI) sees last.
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "%d passed, %d failed\n", p, f }' "$log"
exit "$status"
