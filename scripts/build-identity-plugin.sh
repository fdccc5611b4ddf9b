#!/usr/bin/env bash
# Builds the ember_identity Mosquitto plugin (deploy/mosquitto/ember_identity.c), which binds
# each device's MQTT client id to its certificate (see docs/security.md).
#
#   scripts/build-identity-plugin.sh OUT      OUT: a directory (gets ember_identity.so) or
#                                             a file path ending in .so
#
# Needs gcc and the headers of Debian's mosquitto-dev, libmosquitto-dev and libssl-dev (for
# Mosquitto 2.0.x; `bash scripts/install-deps.sh` installs them). The file is replaced
# atomically, so a running broker keeps the copy it loaded.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
src="$root/deploy/mosquitto/ember_identity.c"

out=${1:?usage: build-identity-plugin.sh OUT_DIR_OR_FILE.so}
[[ $out == *.so ]] || out="$out/ember_identity.so"
mkdir -p "$(dirname "$out")"

missing=()
command -v gcc >/dev/null 2>&1 || missing+=(gcc)
[[ -f /usr/include/mosquitto_broker.h ]] || missing+=(mosquitto-dev)
[[ -f /usr/include/mosquitto.h ]] || missing+=(libmosquitto-dev)
[[ -f /usr/include/openssl/x509.h ]] || missing+=(libssl-dev)
if [[ ${#missing[@]} -gt 0 ]]; then
  echo "build-identity-plugin: missing ${missing[*]}: sudo apt-get install ${missing[*]} (or bash scripts/install-deps.sh)" >&2
  exit 1
fi

tmp="$out.tmp.$$"
trap 'rm -f "$tmp"' EXIT
gcc -std=c99 -O2 -Wall -Wextra -Werror -fPIC -shared "$src" -o "$tmp" -lcrypto
mv -f "$tmp" "$out"
echo "$out"
