#!/usr/bin/env bash
# Builds the control-plane binaries the Kubernetes tests run (kube-apiserver,
# etcd), and any other k8s.io/kubernetes command named as an argument (the
# cluster test's kubelet, kube-proxy, ...), with the machine's Go, once per
# pinned version, into ~/.cache/kloak/k8s-<kubernetes>-etcd-<etcd>/, and
# prints that directory.
# usage: build.sh [COMMAND...]
set -euo pipefail
cd "$(dirname "$0")"
export PATH="$PATH:/usr/local/go/bin" CGO_ENABLED=0
k8s=$(awk '$1 == "require" && $2 == "k8s.io/kubernetes" {print $3}' go.mod)
etcd=$(awk '$1 == "require" && $2 == "go.etcd.io/etcd/server/v3" {print $3}' etcd/go.mod)
out="${KLOAK_CACHE:-$HOME/.cache/kloak}/k8s-$k8s-etcd-$etcd"
mkdir -p "$out"
# The version is stamped as a release build would be: the apiserver derives
# its emulation version from it, and the kubelet reports it.
minor=$(echo "$k8s" | cut -d. -f2)
for cmd in kube-apiserver "$@"; do
  if [ ! -x "$out/$cmd" ]; then
    echo "building $cmd $k8s (several minutes, once)" >&2
    go build -ldflags "-X k8s.io/component-base/version.gitVersion=$k8s -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$minor" \
      -o "$out/$cmd.tmp" "k8s.io/kubernetes/cmd/$cmd"
    mv "$out/$cmd.tmp" "$out/$cmd"
  fi
done
if [ ! -x "$out/etcd" ]; then
  echo "building etcd $etcd (once)" >&2
  (cd etcd && go build -o "$out/etcd.tmp" .)
  mv "$out/etcd.tmp" "$out/etcd"
fi
echo "$out"
