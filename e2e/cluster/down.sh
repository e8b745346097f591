#!/usr/bin/env bash
# Stops what up.sh started and removes what it left: containers, the
# kubelet's mounts, network namespaces, the CNI bridge and its iptables
# rules, kube-proxy's chains, empty kubepods cgroups, DIR itself.
# Idempotent: on a machine without the cluster it does nothing and succeeds.
# usage: down.sh [DIR]
set -uo pipefail
dir=${1:-${KLOAK_CLUSTER_DIR:-/var/lib/kloak-cluster}}
[ "$(id -u)" = 0 ] || { echo "down.sh: run as root" >&2; exit 1; }

stop() { # name
  local f="$dir/run/$1.pid"
  [ -f "$f" ] || return 0
  local pid
  pid=$(cat "$f")
  if kill -0 "$pid" 2>/dev/null; then
    kill "$pid" 2>/dev/null
    for _ in $(seq 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
    kill -9 "$pid" 2>/dev/null
  fi
  rm -f "$f"
}

# The kubelet first, so nothing restarts what goes next.
stop kubelet
stop kube-proxy
# Every container and sandbox: their shims outlive containerd otherwise.
if [ -S /run/containerd/containerd.sock ]; then
  c() { ctr --address /run/containerd/containerd.sock -n k8s.io "$@"; }
  for t in $(c tasks ls -q 2>/dev/null); do c tasks kill -s SIGKILL "$t" >/dev/null 2>&1; done
  sleep 1
  for t in $(c tasks ls -q 2>/dev/null); do c tasks delete -f "$t" >/dev/null 2>&1; done
  for ct in $(c containers ls -q 2>/dev/null); do c containers delete "$ct" >/dev/null 2>&1; done
fi
pkill -9 -f "containerd-shim-runc-v2 -namespace k8s.io" 2>/dev/null
stop containerd
stop kube-scheduler
stop kube-controller-manager
stop kube-apiserver
stop etcd

# Mounts under the kubelet's and containerd's directories, deepest first.
if [ -d "$dir" ]; then
  awk -v d="$dir/" 'index($2, d) == 1 {print $2}' /proc/self/mounts | sort -r | while read -r m; do
    umount -l "$m" 2>/dev/null
  done
fi
awk 'index($2, "/run/containerd/") == 1 || index($2, "/run/netns/") == 1 {print $2}' /proc/self/mounts | sort -r |
  while read -r m; do umount -l "$m" 2>/dev/null; done
for ns in /run/netns/cni-*; do [ -e "$ns" ] && ip netns delete "$(basename "$ns")" 2>/dev/null; done
ip link delete kloak0 2>/dev/null

# kube-proxy's and the CNI plugins' iptables rules.
for table in nat filter mangle; do
  for chain in $(iptables -t "$table" -S 2>/dev/null | awk '$1 == "-N" && ($2 ~ /^KUBE-/ || $2 ~ /^CNI-/) {print $2}'); do
    iptables -t "$table" -F "$chain" 2>/dev/null
  done
  iptables -t "$table" -S 2>/dev/null | awk '$1 == "-A" && /(KUBE-|CNI-)/' | while read -r rule; do
    # -A CHAIN rest → -D CHAIN rest
    eval "iptables -t $table -D ${rule#-A }" 2>/dev/null
  done
  for chain in $(iptables -t "$table" -S 2>/dev/null | awk '$1 == "-N" && ($2 ~ /^KUBE-/ || $2 ~ /^CNI-/) {print $2}'); do
    iptables -t "$table" -X "$chain" 2>/dev/null
  done
done

# Empty pod cgroups (cgroupfs driver: kubepods under every v1 hierarchy).
find /sys/fs/cgroup -depth -type d -name 'kubepods*' 2>/dev/null | while read -r top; do
  find "$top" -depth -type d -exec rmdir {} + 2>/dev/null
done

rm -rf "$dir" /var/lib/cni/networks/kloak /run/containerd 2>/dev/null
echo "down.sh: cluster in $dir removed" >&2
exit 0
