#!/usr/bin/env bash
# A local Mosquitto with mutual TLS and the Ember per-device ACL, for development and demos.
#
#   scripts/secure-broker.sh start [DIR]   generate what is missing in DIR (default
#                                          ./ember-pki: CA, broker and fleet certificates,
#                                          mosquitto.conf, acl) and start the broker
#   scripts/secure-broker.sh stop [DIR]    stop it
#   scripts/secure-broker.sh device ID [DIR]   issue devices/ID.pem and .key for a quick test
#
# Environment: EMBER_MQTTS_PORT (default 8883) for the TLS listener; EMBER_INSECURE_DEV_PORT
# adds a plaintext, anonymous listener on 127.0.0.1 (DEVELOPMENT ONLY; unset by default).
# Uses `ember-fleet pki` (cargo run) unless EMBER_FLEET names a built binary. Nothing here is
# committed: the generated directory holds private keys (mode 0600). See docs/security.md.
set -euo pipefail
cd "$(dirname "$0")/.."

cmd=${1:-}
case "$cmd" in
  start|stop) dir=${2:-ember-pki} ;;
  device) id=${2:?usage: secure-broker.sh device ID [DIR]}; dir=${3:-ember-pki} ;;
  *) echo "usage: $0 start|stop [DIR] | device ID [DIR]" >&2; exit 2 ;;
esac
port=${EMBER_MQTTS_PORT:-8883}

fleet() {
  if [[ -n "${EMBER_FLEET:-}" ]]; then "$EMBER_FLEET" pki "$@"
  else cargo run --quiet -p ember-fleet -- pki "$@"; fi
}

mosquitto_bin() {
  command -v mosquitto || { for p in /usr/sbin/mosquitto /usr/local/sbin/mosquitto; do
    [[ -x $p ]] && { echo "$p"; return; }; done
    echo "mosquitto is not installed: sudo apt-get install mosquitto" >&2; exit 1; }
}

case "$cmd" in
  start)
    mkdir -p "$dir"
    [[ -f $dir/ca.pem ]] || fleet init-ca --dir "$dir" >/dev/null
    [[ -f $dir/server.pem ]] || fleet server-cert --dir "$dir" >/dev/null
    [[ -f $dir/fleet.pem ]] || fleet client-cert --dir "$dir" >/dev/null
    extra=()
    [[ -n "${EMBER_INSECURE_DEV_PORT:-}" ]] && extra=(--insecure-dev-port "$EMBER_INSECURE_DEV_PORT")
    fleet mosquitto-conf --dir "$dir" --port "$port" "${extra[@]}" >/dev/null
    conf=$dir/run.conf
    {
      # Run as root, Mosquitto switches to the `mosquitto` user, which cannot read the 0600
      # keys this script's user owns: keep the current user instead.
      [[ $EUID -eq 0 ]] && echo "user root"
      cat "$dir/mosquitto.conf"
      echo "log_dest file $(realpath "$dir")/mosquitto.log"
      echo "pid_file $(realpath "$dir")/mosquitto.pid"
    } > "$conf"
    if [[ -f $dir/mosquitto.pid ]] && kill -0 "$(cat "$dir/mosquitto.pid")" 2>/dev/null; then
      echo "already running (pid $(cat "$dir/mosquitto.pid"))"; exit 0
    fi
    "$(mosquitto_bin)" -d -c "$conf"
    for _ in $(seq 50); do [[ -s $dir/mosquitto.pid ]] && break; sleep 0.1; done
    [[ -s $dir/mosquitto.pid ]] || { echo "mosquitto did not start; see $dir/mosquitto.log" >&2; exit 1; }
    echo "Mutual-TLS Mosquitto on 127.0.0.1:$port (pid $(cat "$dir/mosquitto.pid"))."
    echo "Fleet: [mqtt] port = $port; [mqtt.tls] ca_file = \"$dir/ca.pem\", cert_file = \"$dir/fleet.pem\", key_file = \"$dir/fleet.key\""
    echo "Device: $0 device <id> $dir, then [mqtt.tls] with devices/<id>.pem and .key"
    ;;
  stop)
    if [[ -f $dir/mosquitto.pid ]]; then
      pid=$(cat "$dir/mosquitto.pid")
      kill "$pid" 2>/dev/null || true
      for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      rm -f "$dir/mosquitto.pid"
      echo "stopped"
    else
      echo "not running"
    fi
    ;;
  device)
    fleet device-cert --dir "$dir" --device-id "$id"
    ;;
esac
