#!/usr/bin/env bash
# Data-path benchmark, as root: release build, then scripts/bench.py.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PATH:/usr/local/go/bin:$HOME/.cargo/bin"
[ "$(id -u)" = 0 ] || { echo "scripts/bench.sh: run as root" >&2; exit 1; }
scripts/install-deps.sh
command -v bpftool >/dev/null || { apt-get install -y -qq bpftool >/dev/null; }
# The wire section's peer: a TLS-terminating nginx that adds the header.
# Only the benchmark needs it, so it is installed here, not by install-deps.sh.
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || {
  apt-get install -y -qq nginx-light >/dev/null || apt-get install -y -qq nginx >/dev/null; }
cargo build --release -p kloak --locked
# BENCH_ONLY=wire (or any of scripts/bench.py's sections): those sections only.
[ -n "${BENCH_ONLY:-}" ] && exec python3 scripts/bench.py
e2e/k8s-tools/build.sh >/dev/null
# State file: restart to ready with 10,000 secrets, 1,000 DNS answers and
# 10,000 connections (target/bench/startup.json); the mirror's cost to the
# event loop and bytes per record (target/bench/mirror.json).
if [ "${BENCH_CONTROLLER_ONLY:-}" != 1 ]; then
  KLOAK_BIN="$PWD/target/release/kloak" cargo bench -p kloak-e2e --bench startup --locked
  cargo bench -p kloak --bench mirror --locked
fi
[ "${BENCH_STATE_ONLY:-}" = 1 ] && exit 0
# Audit spans: sustained export to a real Jaeger, the data path's cost per
# event, a collector that is gone (target/bench/spans.json).
cargo bench -p kloak-e2e --bench spans --locked
[ "${BENCH_SPANS_ONLY:-}" = 1 ] && exit 0
# Controller: Secret → shadow → secret_map latency and RSS with 1,000
# Secrets, against a real kube-apiserver (target/bench/controller.json).
KLOAK_BIN="$PWD/target/release/kloak" cargo bench -p kloak-e2e --bench controller --locked
[ "${BENCH_CONTROLLER_ONLY:-}" = 1 ] && exit 0
exec python3 scripts/bench.py
