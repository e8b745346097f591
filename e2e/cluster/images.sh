#!/usr/bin/env bash
# Builds the cluster test's container images as OCI archives, without a
# registry, and imports them into the node's containerd (namespace k8s.io).
#   kloak:<version>          the release binary and the shared libraries it
#                            links, nothing else (no shell, no package manager)
#   registry.k8s.io/pause    e2e/cluster/pause.c, static
#   kloak-test/tools         Debian minbase with curl, python3 and openssl:
#                            the test's clients and TLS echo server
#   kloak-test/jaeger        the cached Jaeger v2 binary (static Go)
#   kloak-test/coredns       the cached CoreDNS binary (static Go)
# The tools image is cached under ~/.cache/kloak (it takes a debootstrap).
# usage: images.sh KLOAK_BINARY COREDNS_BINARY
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
kloak_bin=$1 coredns_bin=$2
cache="${KLOAK_CACHE:-$HOME/.cache/kloak}/images"
mkdir -p "$cache"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
ctr() { command ctr --address /run/containerd/containerd.sock -n k8s.io "$@"; }

# image NAME TAG ROOTFS OUT.tar ENTRYPOINT...: an OCI archive of ROOTFS.
image() {
  local name=$1 tag=$2 rootfs=$3 out=$4
  shift 4
  local layout="$work/layout-$RANDOM" bundle="$work/bundle-$RANDOM"
  umoci init --layout "$layout"
  umoci new --image "$layout:$tag"
  umoci unpack --rootless --image "$layout:$tag" "$bundle" >/dev/null
  cp -a "$rootfs/." "$bundle/rootfs/"
  umoci repack --image "$layout:$tag" "$bundle"
  local ep=()
  for a in "$@"; do ep+=(--config.entrypoint "$a"); done
  umoci config --image "$layout:$tag" "${ep[@]}" \
    --config.env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
  umoci gc --layout "$layout"
  tar -C "$layout" -cf "$out.tmp" . && mv "$out.tmp" "$out"
  ctr images import --base-name "$name" "$out" >/dev/null
  echo "image $name:$tag" >&2
}

# A binary and the shared libraries it loads, at their own paths.
with_libs() { # ROOTFS BINARY DEST
  install -D -m 0755 "$2" "$1$3"
  ldd "$2" | awk '/=> \// {print $3} /^\t\/lib/ {print $1}' | while read -r lib; do
    install -D -m 0755 "$(readlink -f "$lib")" "$1$lib"
  done
}

version=$("$kloak_bin" --version | awk '{print $2}')
r="$work/kloak-root"
with_libs "$r" "$kloak_bin" /usr/bin/kloak
mkdir -p "$r/tmp" "$r/run/kloak"
image docker.io/library/kloak "$version" "$r" "$work/kloak.tar" /usr/bin/kloak

pause_tar="$cache/pause-3.10-$(sha256sum "$here/pause.c" | cut -c1-12).tar"
if [ ! -f "$pause_tar" ]; then
  r="$work/pause-root"
  mkdir -p "$r"
  gcc -static -O2 -o "$r/pause" "$here/pause.c"
  image registry.k8s.io/pause 3.10 "$r" "$pause_tar" /pause
else
  ctr images import --base-name registry.k8s.io/pause "$pause_tar" >/dev/null
fi

tools_tar="$cache/tools-bookworm-1.tar"
if [ ! -f "$tools_tar" ]; then
  r="$work/tools-root"
  mirror=$(awk '/^URIs:/ {print $2; exit} /^deb / {print $2; exit}' /etc/apt/sources.list.d/debian.sources /etc/apt/sources.list 2>/dev/null || true)
  echo "debootstrap bookworm from ${mirror:-http://deb.debian.org/debian} (once)" >&2
  debootstrap --variant=minbase --include=curl,python3,openssl,ca-certificates,procps \
    bookworm "$r" "${mirror:-http://deb.debian.org/debian}" >/dev/null
  rm -rf "$r/var/cache/apt/archives/"*.deb "$r/var/lib/apt/lists/"*
  image docker.io/kloak-test/tools 1 "$r" "$tools_tar" /bin/sh -c
else
  ctr images import --base-name docker.io/kloak-test/tools "$tools_tar" >/dev/null
fi

r="$work/jaeger-root"
install -D -m 0755 "$("$here/../otel-tools/build.sh")/jaeger" "$r/jaeger"
install -D -m 0644 "$here/../otel-tools/jaeger.yaml" "$r/etc/jaeger.yaml"
image docker.io/kloak-test/jaeger 1 "$r" "$work/jaeger.tar" /jaeger --config /etc/jaeger.yaml

r="$work/coredns-root"
install -D -m 0755 "$coredns_bin" "$r/coredns"
image docker.io/kloak-test/coredns 1 "$r" "$work/coredns.tar" /coredns
