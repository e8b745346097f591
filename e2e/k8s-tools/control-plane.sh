#!/usr/bin/env bash
# Starts a throwaway control plane on loopback for the Kubernetes tests:
# etcd and kube-apiserver (built by build.sh), a test CA, an admin client
# certificate (system:masters) and a service-account signing key, all in DIR.
# usage: control-plane.sh [--foreground] DIR [APISERVER_PORT] [ETCD_PORT]
# Prints "READY https://127.0.0.1:PORT" once /readyz answers; stop with
# `kill $(cat DIR/*.pid)`. With --foreground the script stays, and etcd and
# the apiserver die with it (the test harness's way of never leaking them).
set -euo pipefail
fg=
if [ "${1:-}" = --foreground ]; then fg=1; shift; fi
dir=$1 port=${2:-16443} etcd_port=${3:-23790}
run=()
if [ -n "$fg" ]; then run=(setpriv --pdeathsig KILL --); fi
here=$(cd "$(dirname "$0")" && pwd)
bin=$("$here/build.sh")
mkdir -p "$dir" && cd "$dir"
. "$here/pki.sh"
pki_ca "kloak test CA"
pki_leaf apiserver "/CN=kube-apiserver" "basicConstraints=critical,CA:FALSE\nsubjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes.default.svc\n"
pki_leaf admin "/O=system:masters/CN=kloak-test-admin" "basicConstraints=critical,CA:FALSE\nextendedKeyUsage=clientAuth\n"
openssl genrsa -out sa.key 2048 2>/dev/null
openssl rsa -in sa.key -pubout -out sa.pub 2>/dev/null

"${run[@]}" "$bin/etcd" --data-dir "$dir/etcd-data" --listen-client-urls "http://127.0.0.1:$etcd_port" \
  --advertise-client-urls "http://127.0.0.1:$etcd_port" --listen-peer-urls "http://127.0.0.1:$((etcd_port + 10))" \
  --initial-advertise-peer-urls "http://127.0.0.1:$((etcd_port + 10))" \
  --initial-cluster "default=http://127.0.0.1:$((etcd_port + 10))" \
  >etcd.log 2>&1 &
echo $! > etcd.pid
"${run[@]}" "$bin/kube-apiserver" --etcd-servers="http://127.0.0.1:$etcd_port" --bind-address=127.0.0.1 --advertise-address=127.0.0.1 \
  --secure-port="$port" --tls-cert-file=apiserver.pem --tls-private-key-file=apiserver.key --client-ca-file=ca.pem \
  --service-account-issuer=https://kubernetes.default.svc --service-account-key-file=sa.pub \
  --service-account-signing-key-file=sa.key --authorization-mode=Node,RBAC \
  --service-cluster-ip-range=10.96.0.0/16 --allow-privileged=true >apiserver.log 2>&1 &
echo $! > apiserver.pid
for _ in $(seq 120); do
  if curl -sf --cacert ca.pem --cert admin.pem --key admin.key "https://127.0.0.1:$port/readyz" >/dev/null 2>&1; then
    echo "READY https://127.0.0.1:$port"
    if [ -n "$fg" ]; then
      trap 'kill $(cat "$dir"/*.pid) 2>/dev/null' EXIT TERM INT
      wait
    fi
    exit 0
  fi
  sleep 0.5
done
echo "kube-apiserver did not become ready; see $dir/apiserver.log" >&2
exit 1
