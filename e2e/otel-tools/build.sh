#!/usr/bin/env bash
# Builds Jaeger (v2, the OpenTelemetry-collector-based binary: OTLP in,
# query API out) with the machine's Go, once per pinned version, into
# ~/.cache/kloak/jaeger-<version>/, and prints that directory.
set -euo pipefail
cd "$(dirname "$0")"
export PATH="$PATH:/usr/local/go/bin" CGO_ENABLED=0
v=$(awk '$1 == "require" && $2 == "github.com/jaegertracing/jaeger" {print $3}' go.mod)
out="${KLOAK_CACHE:-$HOME/.cache/kloak}/jaeger-$v"
mkdir -p "$out"
if [ ! -x "$out/jaeger" ]; then
  echo "building jaeger $v (several minutes, once)" >&2
  go build -o "$out/jaeger.tmp" github.com/jaegertracing/jaeger/cmd/jaeger
  mv "$out/jaeger.tmp" "$out/jaeger"
fi
echo "$out"
