#!/usr/bin/env bash
# Demo of the main job: a client under `kloak run` holds only a placeholder,
# a local TLS server prints what it received: the real value.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PATH:/usr/local/go/bin:$HOME/.cargo/bin"
[ "$(id -u)" = 0 ] || { echo "scripts/demo.sh: run as root (it loads BPF programs)" >&2; exit 1; }
scripts/install-deps.sh
cargo build -q -p kloak --locked
KLOAK=target/debug/kloak

work=$(mktemp -d)
cleanup() { [ -n "${server_pid:-}" ] && kill "$server_pid" 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT

openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 1 \
  -keyout "$work/key.pem" -out "$work/cert.pem" -subj /CN=localhost \
  -addext subjectAltName=DNS:localhost,IP:127.0.0.1 2>/dev/null
python3 e2e/fixtures/tls_server.py --cert "$work/cert.pem" --key "$work/key.pem" \
  --record "$work/received.jsonl" >"$work/server.out" &
server_pid=$!
for _ in $(seq 50); do grep -q LISTENING "$work/server.out" 2>/dev/null && break; sleep 0.1; done
port=$(awk '/LISTENING/ {print $2}' "$work/server.out")

secret="sk-demo-$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')"
cat >"$work/secrets.yaml" <<YAML
secrets:
  - name: demo-api-token
    value: "$secret"
    env: API_TOKEN
YAML

echo "== the real secret, known only to kloak: $secret"
echo "== running curl under kloak run"
"$KLOAK" run --secrets "$work/secrets.yaml" -- sh -c "
  echo \"   client environment: API_TOKEN=\$API_TOKEN\"
  curl -sS --cacert $work/cert.pem -H \"Authorization: Bearer \$API_TOKEN\" -d \"token=\$API_TOKEN\" https://localhost:$port/demo >/dev/null
"
echo "== what the TLS server received:"
python3 - "$work/received.jsonl" <<'PY'
import base64, json, sys
for line in open(sys.argv[1]):
    raw = base64.b64decode(json.loads(line)["raw"]).decode()
    for l in raw.split("\r\n"):
        print("   " + l)
PY
if grep -q . "$work/received.jsonl" && python3 -c "
import base64,json,sys
raw=b''.join(base64.b64decode(json.loads(l)['raw']) for l in open('$work/received.jsonl'))
sys.exit(0 if raw.count(b'$secret')==2 else 1)"; then
  echo "== OK: the server got the real value; the client only ever held the placeholder"
else
  echo "== FAILED: the server did not receive the real value" >&2
  exit 1
fi
