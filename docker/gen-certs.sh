#!/usr/bin/env bash
# Generate a throwaway CA and a SuperLink TLS certificate signed by it.
#
#   bash docker/gen-certs.sh OUT_DIR [extra SAN ...]
#
# Writes OUT_DIR/ca.crt, ca.key, server.pem, server.key (EC P-256, valid DAYS days, default 365).
# The server certificate names DNS:superlink (the compose service), DNS:localhost and
# IP:127.0.0.1, plus every extra SAN: "DNS:name" / "IP:address" as given, or a bare name (an
# IPv4 / IPv6 address becomes IP:, anything else DNS:). Keys are mode 0600.
# SuperNodes get ca.crt (--root-certificates), the SuperLink server.pem + server.key + ca.crt
# (--ssl-certfile / --ssl-keyfile / --ssl-ca-certfile); ca.key stays with whoever issues certificates.
# Existing files are never overwritten: the script refuses and changes nothing.
set -euo pipefail

die() { echo "gen-certs.sh: error: $*" >&2; exit 1; }

[[ $# -ge 1 && -n "$1" && "$1" != -* ]] || die "usage: bash docker/gen-certs.sh OUT_DIR [extra SAN ...]
  e.g. bash docker/gen-certs.sh certs coordinator.example.org IP:10.0.0.5"
command -v openssl >/dev/null || die "openssl not found on PATH (install it, e.g. apt-get install openssl)"

out=$1
shift
days=${DAYS:-365}
[[ $days =~ ^[1-9][0-9]*$ ]] || die "DAYS must be a positive integer, got '$days'"

sans="DNS:superlink,DNS:localhost,IP:127.0.0.1"
for san in "$@"; do
    case $san in
        DNS:?* | IP:?*) entry=$san ;;
        *:*:*) entry="IP:$san" ;;  # IPv6
        *) if [[ $san =~ ^[0-9]+\.[0-9]+\.[0-9]+\.[0-9]+$ ]]; then entry="IP:$san"; else entry="DNS:$san"; fi ;;
    esac
    [[ $entry =~ ^(DNS|IP):[A-Za-z0-9.*:_-]+$ ]] \
        || die "extra SAN '$san': expected a host name or IP address (optionally prefixed DNS: or IP:)"
    sans+=",$entry"
done

files=(ca.crt ca.key server.pem server.key)
if [[ -e $out && ! -d $out ]]; then die "OUT_DIR '$out' exists and is not a directory"; fi
mkdir -p -- "$out" || die "cannot create OUT_DIR '$out'"
existing=()
for f in "${files[@]}"; do [[ -e $out/$f || -L $out/$f ]] && existing+=("$out/$f"); done
[[ ${#existing[@]} -eq 0 ]] || die "refusing to overwrite ${existing[*]} (remove them or choose another OUT_DIR)"

# Everything is generated in a private directory inside OUT_DIR, then linked into place: a
# failure leaves nothing half-written, and `ln` refuses a file that appeared meanwhile.
umask 077
work=$(mktemp -d "$out/.gen-certs.XXXXXX") || die "cannot write to OUT_DIR '$out'"
trap 'rm -rf -- "$work"' EXIT

run() {  # run openssl quietly; on failure show its output
    local log
    if ! log=$(openssl "$@" 2>&1); then die "openssl $1 failed:
$log"; fi
}

run req -x509 -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -sha256 -days "$days" \
    -subj "/CN=facefl CA" -keyout "$work/ca.key" -out "$work/ca.crt" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign"
run req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -sha256 \
    -subj "/CN=superlink" -keyout "$work/server.key" -out "$work/server.csr"
printf '%s\n' "subjectAltName=$sans" "basicConstraints=critical,CA:FALSE" \
    "keyUsage=critical,digitalSignature" "extendedKeyUsage=serverAuth" > "$work/server.ext"
run x509 -req -sha256 -days "$days" -in "$work/server.csr" -CA "$work/ca.crt" -CAkey "$work/ca.key" \
    -set_serial "0x$(openssl rand -hex 16)" -extfile "$work/server.ext" -out "$work/server.pem"
run verify -CAfile "$work/ca.crt" "$work/server.pem"

chmod 0600 "$work/ca.key" "$work/server.key"
chmod 0644 "$work/ca.crt" "$work/server.pem"
linked=()
for f in "${files[@]}"; do
    if ! ln -- "$work/$f" "$out/$f" 2>/dev/null; then
        for g in "${linked[@]}"; do rm -f -- "$out/$g"; done
        die "could not create $out/$f (it appeared meanwhile, or OUT_DIR is not writable); nothing written"
    fi
    linked+=("$f")
done
echo "gen-certs.sh: wrote ${files[*]} to $out (server SANs: $sans; valid $days days)"
