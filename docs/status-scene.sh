#!/usr/bin/env bash
# The scene behind README's status reports: a device connected with a push delivered, then
# the gateway unreachable (killed), then back. Loopback only; cleans up after itself.
# Run from the checkout with the venv: bash docs/status-scene.sh
set -u
cd "$(dirname "$0")/.."
bin=${VENV:-.venv}/bin
dir=$(mktemp -d /tmp/pushd-scene-XXXX)
trap 'kill $(jobs -p) 2>/dev/null; wait 2>/dev/null; rm -rf "$dir"' EXIT
courier=25223 provider=22197

gateway() {
  "$bin/twistd" -n --pidfile= -l "$dir/gateway.log" pushd-gateway -d "$dir/gateway" \
    --courier "tls:$courier:interface=127.0.0.1" --provider "tls:$provider:interface=127.0.0.1" &
  gw=$!
  for _ in $(seq 50); do grep -q "Site (TLS) starting" "$dir/gateway.log" 2>/dev/null && return; sleep 0.1; done
}
status() { echo "\$ pushctl status"; "$bin/pushctl" status -s "$dir/device/pushd.sock"; echo; }

gateway
"$bin/twistd" -n --pidfile= -l "$dir/device.log" pushd-device -d "$dir/device" \
  --transport "tls:127.0.0.1:$courier" --tls-name localhost \
  --enrol-url "https://127.0.0.1:$provider" --enrol-secret-file "$dir/gateway/enrol.secret" --max-delay 4 &
sleep 2
"$bin/pushctl" listen -s "$dir/device/pushd.sock" com.example.app > "$dir/app.out" 2> "$dir/app.err" &
sleep 1
token=$(awk '/^token/ {print $2}' "$dir/app.err")
"$bin/pushctl" send -g "127.0.0.1:$provider" -d "$dir/gateway" "$token" com.example.app '{"aps":{"alert":"hello"}}' > /dev/null
sleep 1
echo "# connected, one push delivered"
status

kill -9 "$gw"; wait "$gw" 2>/dev/null
sleep 6
echo "# the gateway unreachable"
status
sleep 5
status

gateway
sleep 6
echo "# the gateway back"
status
