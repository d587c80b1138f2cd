#!/usr/bin/env bash
# Capture real ClientHellos as seeds for the peek_route fuzz target: containerd's Go client
# (ctr), skopeo (Go), curl and openssl s_client each connect to a loopback listener that
# saves the first TLS record and hangs up. Run as root (ctr needs a containerd); the output
# is committed under fuzz/seeds/peek_route/, so this runs only to refresh the fixtures.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="$here/peek_route"
port=18443
work="$(mktemp -d /tmp/eddy-capture.XXXXXX)"
ctd_pid=""
cleanup() {
  [ -n "$ctd_pid" ] && kill "$ctd_pid" 2>/dev/null && wait "$ctd_pid" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
mkdir -p "$out"

# capture NAME CMD...: listen, run the client against ghcr.io:$port (resolved to loopback).
capture() {
  local name="$1"; shift
  python3 "$here/first_record.py" "$port" "$out/$name" &
  local listener=$!
  for _ in $(seq 100); do ss -ltn "sport = :$port" | grep -q LISTEN && break; sleep 0.1; done
  timeout 15 "$@" >/dev/null 2>&1 || true
  wait "$listener" || { echo "no ClientHello from $name" >&2; exit 1; }
  echo "$name: $(stat -c %s "$out/$name") bytes"
}

# Go clients resolve through /etc/hosts: give them a private one.
echo "127.0.0.1 ghcr.io registry.test" > "$work/hosts"
private_hosts=(unshare --mount sh -c "mount --bind '$work/hosts' /etc/hosts && exec \"\$@\"" sh)

cat > "$work/containerd.toml" <<TOML
version = 2
root = "$work/root"
state = "$work/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "$work/containerd.sock"
[ttrpc]
  address = "$work/containerd.sock.ttrpc"
TOML
containerd --config "$work/containerd.toml" >"$work/containerd.log" 2>&1 &
ctd_pid=$!
for _ in $(seq 100); do
  ctr --address "$work/containerd.sock" version >/dev/null 2>&1 && break
  sleep 0.1
done

capture ctr-go "${private_hosts[@]}" ctr --address "$work/containerd.sock" images pull "ghcr.io:$port/library/busybox:latest"
capture skopeo-go "${private_hosts[@]}" skopeo inspect "docker://ghcr.io:$port/library/busybox:latest"
capture curl curl -sk --resolve "ghcr.io:$port:127.0.0.1" "https://ghcr.io:$port/v2/"
capture curl-http2 curl -sk --http2 --resolve "ghcr.io:$port:127.0.0.1" "https://ghcr.io:$port/v2/"
capture openssl-s_client sh -c "openssl s_client -connect 127.0.0.1:$port -servername ghcr.io </dev/null"
capture openssl-tls12 sh -c "openssl s_client -tls1_2 -connect 127.0.0.1:$port -servername registry.test </dev/null"
capture openssl-no-sni sh -c "openssl s_client -noservername -connect 127.0.0.1:$port </dev/null"
