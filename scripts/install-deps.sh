#!/usr/bin/env bash
# Installs what a fresh Debian/Ubuntu machine lacks to build and test Kloak.
# Idempotent: apt runs only when a package is missing.
set -euo pipefail

need_root() {
  if [ "$(id -u)" != 0 ]; then
    echo "install-deps: run as root (apt-get, and the tests load BPF programs)" >&2
    exit 1
  fi
}

# clang builds the BPF programs; libbpf/libelf/zlib link libbpf-sys; the rest are the
# real TLS clients and tools the end-to-end tests drive.
PKGS=(clang llvm iptables libbpf-dev libelf-dev zlib1g-dev pkg-config make curl openssl ca-certificates python3 libssl3 dnsmasq-base util-linux libssl-dev gnutls-bin gcc)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ! command -v go >/dev/null 2>&1 && [ ! -x /usr/local/go/bin/go ]; then
  missing+=(golang-go)
fi
command -v node >/dev/null 2>&1 || missing+=(nodejs)
if [ ${#missing[@]} -gt 0 ]; then
  need_root
  echo "install-deps: installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# hyper-h2: the strict HTTP/2 server the HTTP/2 tests record with.
if ! python3 -c "import h2" >/dev/null 2>&1; then
  echo "install-deps: installing the h2 Python package"
  python3 -m pip install --quiet --root-user-action=ignore h2
fi
# cryptography: the wire tests decrypt a pod's own capture with its own
# TLS keys, as a hostile application could.
if ! python3 -c "import cryptography" >/dev/null 2>&1; then
  echo "install-deps: installing the cryptography Python package"
  python3 -m pip install --quiet --root-user-action=ignore cryptography
fi

if ! command -v cargo >/dev/null 2>&1; then
  echo "install-deps: cargo not found; Kloak needs Rust 1.90 or later (rustup toolchain)" >&2
  exit 1
fi
