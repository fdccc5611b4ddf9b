#!/usr/bin/env bash
# A local Mosquitto with mutual TLS, the Ember per-device ACL, the one-device-one-client-id
# rule and persistence, for development and demos.
#
#   scripts/secure-broker.sh start [DIR] [FLAGS]   generate what is missing in DIR (default
#                                          ./ember-pki: CA, broker and fleet certificates, the
#                                          ember_identity plugin), write mosquitto.conf and acl
#                                          (FLAGS go to `ember-fleet pki mosquitto-conf`, e.g.
#                                          --offline-window-s 7200 --expected-rate 200) and
#                                          start the broker; its state lives in DIR/data/
#   scripts/secure-broker.sh stop [DIR]    stop it (SIGTERM: Mosquitto saves its state first)
#   scripts/secure-broker.sh device ID [DIR]   issue devices/ID.pem and .key for a quick test
#
# Environment: EMBER_MQTTS_PORT (default 8883) for the TLS listener; EMBER_INSECURE_DEV_PORT
# adds a plaintext, anonymous listener on 127.0.0.1 (DEVELOPMENT ONLY; unset by default).
# Uses `ember-fleet pki` (cargo run) unless EMBER_FLEET names a built binary; builds the plugin
# with scripts/build-identity-plugin.sh (gcc, mosquitto-dev, libmosquitto-dev, libssl-dev).
# Nothing here is committed: the generated directory holds private keys (mode 0600). See
# docs/security.md and docs/operations.md ("Broker configuration (Mosquitto)").
set -euo pipefail
cd "$(dirname "$0")/.."

cmd=${1:-}
conf_flags=()
case "$cmd" in
  start|stop)
    dir=ember-pki
    if [[ $# -ge 2 && $2 != --* ]]; then dir=$2; shift; fi
    shift
    conf_flags=("$@")
    [[ $cmd == stop && ${#conf_flags[@]} -gt 0 ]] && { echo "usage: $0 stop [DIR]" >&2; exit 2; }
    ;;
  device) id=${2:?usage: secure-broker.sh device ID [DIR]}; dir=${3:-ember-pki} ;;
  *) echo "usage: $0 start [DIR] [mosquitto-conf flags] | stop [DIR] | device ID [DIR]" >&2; exit 2 ;;
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
    # Rebuilt when its source is newer (the running broker keeps the copy it loaded).
    [[ $dir/ember_identity.so -nt deploy/mosquitto/ember_identity.c ]] ||
      bash scripts/build-identity-plugin.sh "$dir" >/dev/null
    extra=()
    [[ -n "${EMBER_INSECURE_DEV_PORT:-}" ]] && extra=(--insecure-dev-port "$EMBER_INSECURE_DEV_PORT")
    fleet mosquitto-conf --dir "$dir" --port "$port" "${extra[@]}" "${conf_flags[@]}" >/dev/null
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
    echo "Mutual-TLS Mosquitto on 127.0.0.1:$port (pid $(cat "$dir/mosquitto.pid")), state in $dir/data/."
    echo "Fleet: [mqtt] port = $port, client_id starting with ember-fleet; [mqtt.tls] ca_file = \"$dir/ca.pem\", cert_file = \"$dir/fleet.pem\", key_file = \"$dir/fleet.key\""
    echo "Device: $0 device <id> $dir, then [mqtt.tls] with devices/<id>.pem and .key (client_id = <id>, the default)"
    ;;
  stop)
    if [[ -f $dir/mosquitto.pid ]]; then
      pid=$(cat "$dir/mosquitto.pid")
      kill "$pid" 2>/dev/null || true
      # It saves its whole state before it exits: give a large queue time.
      for _ in $(seq 300); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      if kill -0 "$pid" 2>/dev/null; then
        echo "mosquitto (pid $pid) is still saving after 30 s; see $dir/mosquitto.log" >&2; exit 1
      fi
      rm -f "$dir/mosquitto.pid"
      echo "stopped (state saved in $dir/data/)"
    else
      echo "not running"
    fi
    ;;
  device)
    fleet device-cert --dir "$dir" --device-id "$id"
    ;;
esac
