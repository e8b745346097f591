#!/usr/bin/env bash
# Starts one Jaeger for a whole test run (scripts/test.sh), so the run's
# leak check can read every span any test exported. Usage: serve.sh DIR.
# Writes DIR/jaeger.pid and DIR/jaeger.log, and prints the two variables
# the harness reads (KLOAK_E2E_JAEGER_OTLP, KLOAK_E2E_JAEGER_QUERY).
set -euo pipefail
dir=$1
bin="$("$(dirname "$0")/build.sh")/jaeger"
read -r grpc http query qgrpc < <(python3 -c '
import socket
ss = [socket.socket() for _ in range(4)]
for s in ss: s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in ss))')
JAEGER_HOST=127.0.0.1 JAEGER_OTLP_GRPC=$grpc JAEGER_OTLP_HTTP=$http \
  JAEGER_QUERY_HTTP=$query JAEGER_QUERY_GRPC=$qgrpc \
  setsid "$bin" --config "$(dirname "$0")/jaeger.yaml" </dev/null >/dev/null 2>"$dir/jaeger.log" &
echo $! >"$dir/jaeger.pid"
for _ in $(seq 600); do
  if (exec 3<>"/dev/tcp/127.0.0.1/$query" && exec 4<>"/dev/tcp/127.0.0.1/$grpc") 2>/dev/null; then
    echo "KLOAK_E2E_JAEGER_OTLP=http://127.0.0.1:$grpc"
    echo "KLOAK_E2E_JAEGER_QUERY=127.0.0.1:$query"
    exit 0
  fi
  kill -0 "$(cat "$dir/jaeger.pid")" 2>/dev/null || { cat "$dir/jaeger.log" >&2; exit 1; }
  sleep 0.1
done
echo "jaeger did not start; its log: $dir/jaeger.log" >&2
exit 1
