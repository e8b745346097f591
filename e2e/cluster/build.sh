#!/usr/bin/env bash
# Builds the cluster test's Go tools with the machine's Go, once per pinned
# version, into ~/.cache/kloak/<tool>-<version>/, and prints that directory.
# usage: build.sh helm|coredns
set -euo pipefail
cd "$(dirname "$0")/$1"
export PATH="$PATH:/usr/local/go/bin" CGO_ENABLED=0
case $1 in
  helm) mod=helm.sh/helm/v3 pkg=helm.sh/helm/v3/cmd/helm ;;
  coredns) mod=github.com/coredns/coredns pkg=github.com/coredns/coredns ;;
  *) echo "build.sh: unknown tool $1" >&2; exit 2 ;;
esac
v=$(awk -v m="$mod" '$1 == "require" && $2 == m {print $3}' go.mod)
out="${KLOAK_CACHE:-$HOME/.cache/kloak}/$1-$v"
mkdir -p "$out"
if [ ! -x "$out/$1" ]; then
  echo "building $1 $v (minutes, once)" >&2
  ldflags=
  if [ "$1" = helm ]; then ldflags="-X helm.sh/helm/v3/internal/version.version=$v"; fi
  go build -ldflags "$ldflags" -o "$out/$1.tmp" "$pkg"
  mv "$out/$1.tmp" "$out/$1"
fi
echo "$out"
