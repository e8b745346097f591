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
# Jaeger for the observability tests and the run's leak check, likewise
# (~5 minutes cold).
e2e/otel-tools/build.sh >/dev/null
# The single-node cluster of e2e/tests/cluster.rs: kubelet and the rest of
# Kubernetes, helm and CoreDNS, likewise (~15 minutes cold).
e2e/k8s-tools/build.sh kube-controller-manager kube-scheduler kubelet kube-proxy kubectl >/dev/null
e2e/cluster/build.sh helm >/dev/null
e2e/cluster/build.sh coredns >/dev/null

cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo clippy -p kloak-e2e --all-targets --features whole-run --locked -- -D warnings
# The end-to-end tests drive the real binary.
cargo build --workspace --locked
log=$(mktemp)
# The whole run's record (secret values, agent logs, /metrics texts) and its
# Jaeger, for the leak check that runs last (e2e/tests/whole_run.rs).
export KLOAK_E2E_RUN_DIR
KLOAK_E2E_RUN_DIR=$(mktemp -d /tmp/kloak-e2e-run.XXXXXX)
trap 'kill -KILL "$(cat "$KLOAK_E2E_RUN_DIR/jaeger.pid" 2>/dev/null)" 2>/dev/null || true; rm -rf "$log" "$KLOAK_E2E_RUN_DIR"' EXIT
jaeger_env=$(e2e/otel-tools/serve.sh "$KLOAK_E2E_RUN_DIR")
for kv in $jaeger_env; do export "${kv?}"; done
set +e
cargo test --workspace --locked --no-fail-fast 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
cargo test -p kloak-e2e --features whole-run --test whole_run --locked -- --nocapture 2>&1 | tee -a "$log"
[ "${PIPESTATUS[0]}" = 0 ] || status=1
set -e
# One closing line over every test binary, so the total is what a reader (or CI) sees last.
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "%d passed, %d failed\n", p, f }' "$log"
exit "$status"
