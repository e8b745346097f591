#!/usr/bin/env bash
# Brings up a real single-node Kubernetes cluster on this machine, as root:
# etcd, kube-apiserver, kube-controller-manager, kube-scheduler (built by
# e2e/k8s-tools/build.sh), containerd + runc from Debian with the CNI bridge,
# kubelet and kube-proxy (iptables mode), and CoreDNS as the cluster DNS.
# Idempotent: when the cluster in DIR already answers, it only prints.
# Prints KUBECONFIG=<path> when the node is Ready and cluster DNS serves.
# Everything lives under DIR (default /var/lib/kloak-cluster); down.sh
# removes it and everything it started.
# usage: up.sh [DIR]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
dir=${1:-${KLOAK_CLUSTER_DIR:-/var/lib/kloak-cluster}}
node=kloak-node
export PATH="$PATH:/usr/local/go/bin"
[ "$(id -u)" = 0 ] || { echo "up.sh: run as root" >&2; exit 1; }

kubeconfig="$dir/admin.kubeconfig"
if [ -f "$kubeconfig" ] && [ -x "$dir/bin/kubectl" ] &&
  "$dir/bin/kubectl" --kubeconfig "$kubeconfig" get node "$node" >/dev/null 2>&1; then
  # Up already: only the kloak image is rebuilt from this tree.
  (cd "$here/../.." && cargo build --release -p kloak --locked >&2)
  "$here/images.sh" "$here/../../target/release/kloak" "$("$here/build.sh" coredns)/coredns"
  echo "KUBECONFIG=$kubeconfig"
  exit 0
fi
t0=$(date +%s)
phase() { echo "up.sh: $1 ($(($(date +%s) - t0)) s)" >&2; }

# --- packages and binaries ----------------------------------------------------
pkgs=(containerd runc containernetworking-plugins iptables conntrack umoci debootstrap)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
k8s=$("$here/../k8s-tools/build.sh" kube-controller-manager kube-scheduler kubelet kube-proxy kubectl)
coredns=$("$here/build.sh" coredns)
mkdir -p "$dir/bin" "$dir/pki" "$dir/logs" "$dir/run"
for b in etcd kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy kubectl; do
  ln -sf "$k8s/$b" "$dir/bin/$b"
done
phase "binaries ready"

# --- node settings (see ../shared/notes/platform.md) --------------------------
node_ip=$(ip -4 route get 1.1.1.1 | awk '{for (i = 1; i < NF; i++) if ($i == "src") print $(i+1)}')
sysctl -qw net.ipv4.ip_forward=1
sysctl -qw net.bridge.bridge-nf-call-iptables=1 2>/dev/null || true
mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf
mountpoint -q /sys/kernel/tracing || mount -t tracefs tracefs /sys/kernel/tracing
# The agent's host mounts propagate into its container (HostToContainer),
# which needs shared mounts, as a systemd host has everywhere.
for m in /sys/fs/bpf /sys/kernel/tracing /sys/fs/cgroup; do mount --make-rshared "$m"; done

# --- PKI ---------------------------------------------------------------------
cd "$dir/pki"
if [ ! -f ca.pem ]; then
  . "$here/../k8s-tools/pki.sh"
  pki_ca "kloak cluster CA"
  client="basicConstraints=critical,CA:FALSE\nextendedKeyUsage=clientAuth\n"
  pki_leaf apiserver "/CN=kube-apiserver" "basicConstraints=critical,CA:FALSE\nsubjectAltName=IP:127.0.0.1,IP:$node_ip,IP:10.96.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local\n"
  pki_leaf kubelet-serving "/CN=$node" "basicConstraints=critical,CA:FALSE\nextendedKeyUsage=serverAuth\nsubjectAltName=IP:$node_ip,DNS:$node\n"
  pki_leaf admin "/O=system:masters/CN=kloak-cluster-admin" "$client"
  pki_leaf apiserver-kubelet "/O=system:masters/CN=kube-apiserver-kubelet-client" "$client"
  pki_leaf controller-manager "/CN=system:kube-controller-manager" "$client"
  pki_leaf scheduler "/CN=system:kube-scheduler" "$client"
  pki_leaf kubelet "/O=system:nodes/CN=system:node:$node" "$client"
  pki_leaf kube-proxy "/CN=system:kube-proxy" "$client"
  openssl genrsa -out sa.key 2048 2>/dev/null
  openssl rsa -in sa.key -pubout -out sa.pub 2>/dev/null
fi
kcfg() { # name user server
  cat >"$dir/$1.kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: kloak
  cluster: {certificate-authority: $dir/pki/ca.pem, server: $3}
users:
- name: $2
  user: {client-certificate: $dir/pki/$2.pem, client-key: $dir/pki/$2.key}
contexts:
- name: kloak
  context: {cluster: kloak, user: $2}
current-context: kloak
EOF
}
api="https://$node_ip:6443"
for u in admin controller-manager scheduler kubelet kube-proxy; do kcfg "$u" "$u" "$api"; done

# --- control plane -------------------------------------------------------------
start() { # name command...: in the background, its pid in run/NAME.pid
  local name=$1
  shift
  if [ -f "$dir/run/$name.pid" ] && kill -0 "$(cat "$dir/run/$name.pid")" 2>/dev/null; then return; fi
  setsid "$@" </dev/null >"$dir/logs/$name.log" 2>&1 &
  echo $! >"$dir/run/$name.pid"
}
wait_for() { # what seconds command...
  local what=$1 secs=$2
  shift 2
  for _ in $(seq $((secs * 2))); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 0.5
  done
  echo "up.sh: $what did not come up; logs in $dir/logs" >&2
  exit 1
}
start etcd "$dir/bin/etcd" --data-dir "$dir/etcd" --listen-client-urls http://127.0.0.1:2379 \
  --advertise-client-urls http://127.0.0.1:2379 --listen-peer-urls http://127.0.0.1:2380 \
  --initial-advertise-peer-urls http://127.0.0.1:2380 --initial-cluster default=http://127.0.0.1:2380
start kube-apiserver "$dir/bin/kube-apiserver" --etcd-servers=http://127.0.0.1:2379 \
  --bind-address=0.0.0.0 --advertise-address="$node_ip" --secure-port=6443 \
  --tls-cert-file=apiserver.pem --tls-private-key-file=apiserver.key --client-ca-file=ca.pem \
  --kubelet-client-certificate=apiserver-kubelet.pem --kubelet-client-key=apiserver-kubelet.key \
  --kubelet-certificate-authority=ca.pem --kubelet-preferred-address-types=InternalIP \
  --service-account-issuer=https://kubernetes.default.svc --service-account-key-file=sa.pub \
  --service-account-signing-key-file=sa.key --authorization-mode=Node,RBAC \
  --service-cluster-ip-range=10.96.0.0/16 --allow-privileged=true
kubectl() { "$dir/bin/kubectl" --kubeconfig "$kubeconfig" "$@"; }
wait_for kube-apiserver 120 kubectl get --raw /readyz
start kube-controller-manager "$dir/bin/kube-controller-manager" --kubeconfig="$dir/controller-manager.kubeconfig" \
  --authentication-kubeconfig="$dir/controller-manager.kubeconfig" --authorization-kubeconfig="$dir/controller-manager.kubeconfig" \
  --service-account-private-key-file=sa.key --root-ca-file=ca.pem --use-service-account-credentials=true \
  --cluster-signing-cert-file=ca.pem --cluster-signing-key-file=ca.key --bind-address=127.0.0.1
start kube-scheduler "$dir/bin/kube-scheduler" --kubeconfig="$dir/scheduler.kubeconfig" \
  --authentication-kubeconfig="$dir/scheduler.kubeconfig" --authorization-kubeconfig="$dir/scheduler.kubeconfig" \
  --bind-address=127.0.0.1
phase "control plane up"

# --- containerd, CNI -----------------------------------------------------------
mkdir -p "$dir/cni/net.d" "$dir/containerd"
cat >"$dir/cni/net.d/10-bridge.conflist" <<'EOF'
{
  "cniVersion": "1.0.0",
  "name": "kloak",
  "plugins": [
    {"type": "bridge", "bridge": "kloak0", "isGateway": true, "ipMasq": true, "hairpinMode": true,
     "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.88.0.0/16"}]], "routes": [{"dst": "0.0.0.0/0"}]}},
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}
EOF
cat >"$dir/containerd.toml" <<EOF
version = 2
root = "$dir/containerd"
state = "/run/containerd"
[grpc]
  address = "/run/containerd/containerd.sock"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "registry.k8s.io/pause:3.10"
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$dir/cni/net.d"
EOF
start containerd containerd --config "$dir/containerd.toml"
wait_for containerd 30 ctr --address /run/containerd/containerd.sock version
phase "containerd up"

# --- images --------------------------------------------------------------------
(cd "$here/../.." && cargo build --release -p kloak --locked >&2)
"$here/images.sh" "$here/../../target/release/kloak" "$coredns/coredns"
phase "images imported"

# --- kubelet, kube-proxy -------------------------------------------------------
cat >"$dir/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: $dir/pki/ca.pem}
authorization: {mode: Webhook}
tlsCertFile: $dir/pki/kubelet-serving.pem
tlsPrivateKeyFile: $dir/pki/kubelet-serving.key
cgroupDriver: cgroupfs
failCgroupV1: false
failSwapOn: false
containerRuntimeEndpoint: unix:///run/containerd/containerd.sock
clusterDNS: [10.96.0.10]
clusterDomain: cluster.local
resolvConf: /etc/resolv.conf
# No registry: an image the kubelet garbage-collects could never come back.
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: {memory.available: "100Mi"}
protectKernelDefaults: false
serializeImagePulls: false
EOF
start kubelet "$dir/bin/kubelet" --config="$dir/kubelet.yaml" --kubeconfig="$dir/kubelet.kubeconfig" \
  --root-dir="$dir/kubelet" --hostname-override="$node" --node-ip="$node_ip"
cat >"$dir/kube-proxy.yaml" <<EOF
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection: {kubeconfig: $dir/kube-proxy.kubeconfig}
mode: iptables
clusterCIDR: 10.88.0.0/16
hostnameOverride: $node
metricsBindAddress: 127.0.0.1:10249
healthzBindAddress: 127.0.0.1:10256
EOF
start kube-proxy "$dir/bin/kube-proxy" --config="$dir/kube-proxy.yaml"
wait_for "node $node" 120 kubectl wait --for=condition=Ready "node/$node" --timeout=1s
phase "node ready"

# --- cluster DNS -----------------------------------------------------------------
kubectl apply -f "$here/coredns.yaml" >/dev/null
wait_for CoreDNS 120 kubectl -n kube-system wait --for=condition=Available deployment/coredns --timeout=1s
phase "cluster DNS up"
echo "KUBECONFIG=$kubeconfig"
