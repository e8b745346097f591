# Sourced by control-plane.sh and e2e/cluster/up.sh: a throwaway CA and
# leaves signed by it, in the current directory (EC P-256, a few days).
# pki_ca "CN"; pki_leaf NAME SUBJECT EXTENSIONS (printf %b escapes allowed).
pki_ec=(-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes)
pki_ca() {
  openssl req -x509 "${pki_ec[@]}" -keyout ca.key -out ca.pem -subj "/CN=$1" -days 7 2>/dev/null
}
pki_leaf() {
  openssl req "${pki_ec[@]}" -keyout "$1.key" -out "$1.csr" -subj "$2" 2>/dev/null
  printf '%b' "$3" >"$1.ext"
  openssl x509 -req -in "$1.csr" -CA ca.pem -CAkey ca.key -CAcreateserial -out "$1.pem" -days 7 \
    -extfile "$1.ext" 2>/dev/null
}
