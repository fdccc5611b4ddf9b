#!/usr/bin/env bash
# The local stack (deploy/compose.yaml) in steps, each idempotent. scripts/up.sh local and
# scripts/down.sh local run them in order; terraform/local runs them as separate resources.
#
#   deploy/local/stack.sh images        build the images that are missing (deploy/build-images.sh)
#   deploy/local/stack.sh secrets       the PKI, the database password, the fleet's config (files)
#   deploy/local/stack.sh start         docker compose up (the containers, networks, volumes)
#   deploy/local/stack.sh wait          until the fleet and every agent are healthy and the API
#                                       answers over HTTPS
#   deploy/local/stack.sh token         a read-scope API token in $EMBER_STATE_DIR/read-token
#   deploy/local/stack.sh up            all of the above, then prints where things are
#   deploy/local/stack.sh down          removes the containers, networks and volumes
#   deploy/local/stack.sh clean         removes the generated secrets ($EMBER_STATE_DIR)
#   deploy/local/stack.sh check-clean   fails listing whatever of the stack is left
#   deploy/local/stack.sh compose ARGS  docker compose with the stack's files and project
#
# Settings (environment): EMBER_STATE_DIR (default deploy/.state/local: secrets and generated
# files), EMBER_AGENTS (agents, default 2: devices edge-1..edge-N), EMBER_HTTPS_PORT (the API
# and dashboard on 127.0.0.1, default 8443), EMBER_MQTT_PORT (the broker on 127.0.0.1, default
# 8883), EMBER_COMPOSE_PROJECT (default ember-local), EMBER_WAIT_S (health timeout, default 240),
# EMBER_AGENT_PLATFORMS (the agents' architectures, given in turn to edge-1, edge-2, ...: amd64,
# arm64, armv7; default amd64; ARM agents run their own image under qemu-user-static's binfmt
# handlers, as on a board).
#
# Files are written by containers (the ember-fleet image's `pki` command, a root shell in
# debian:bookworm-slim) so that each private key can be owned by the uid of the one container
# that reads it, with mode 0600, whoever runs this script (root or a member of the docker group).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
VERSION=$(sed -nE 's/^version = "([^"]+)"/\1/p' "$ROOT/Cargo.toml" | head -1)
export EMBER_VERSION=$VERSION
export EMBER_STATE_DIR=${EMBER_STATE_DIR:-$ROOT/deploy/.state/local}
export EMBER_HTTPS_PORT=${EMBER_HTTPS_PORT:-8443}
export EMBER_MQTT_PORT=${EMBER_MQTT_PORT:-8883}
PROJECT=${EMBER_COMPOSE_PROJECT:-ember-local}
AGENTS=${EMBER_AGENTS:-2}
PLATFORMS=${EMBER_AGENT_PLATFORMS:-amd64}
WAIT_S=${EMBER_WAIT_S:-240}
STATE=$EMBER_STATE_DIR
IMAGES=("ember-fleet:$VERSION" "ember-agent:$VERSION" "ember-mosquitto:$VERSION" "ember-postgres:15")
# The uids the images run as (deploy/*/Dockerfile).
UID_FLEET=10001 UID_AGENT=10002 UID_BROKER=10883 UID_POSTGRES=10999

die() { echo "stack: $*" >&2; exit 1; }
say() { echo "stack: $*" >&2; }

[[ $AGENTS =~ ^[1-9][0-9]?$ ]] || die "EMBER_AGENTS=$AGENTS: use 1-99"
[[ $STATE == /* ]] || die "EMBER_STATE_DIR=$STATE must be an absolute path"
[[ $PLATFORMS =~ ^(amd64|arm64|armv7)(,(amd64|arm64|armv7))*$ ]] ||
  die "EMBER_AGENT_PLATFORMS=$PLATFORMS: use a comma-separated list of amd64, arm64, armv7"
IFS=, read -ra PLATFORM_LIST <<<"$PLATFORMS"
# The architecture of device edge-N (the list, in turn), its image and its docker platform.
platform_of() { local n=${1#edge-}; echo "${PLATFORM_LIST[$(((n - 1) % ${#PLATFORM_LIST[@]}))]}"; }
agent_image() { [[ $1 == amd64 ]] && echo "ember-agent:$VERSION" || echo "ember-agent:$VERSION-$1"; }
docker_platform() { case $1 in amd64) echo linux/amd64 ;; arm64) echo linux/arm64 ;; armv7) echo linux/arm/v7 ;; esac; }
for p in "${PLATFORM_LIST[@]}"; do
  [[ $p == amd64 ]] || IMAGES+=("$(agent_image "$p")")
done

need_docker() {
  command -v docker >/dev/null 2>&1 || die "docker is missing: install Docker Engine (Debian: apt-get install docker.io)"
  docker info >/dev/null 2>&1 || die "cannot reach the Docker Engine: is dockerd running, and may $(id -un) use it (group docker)?"
  if docker compose version >/dev/null 2>&1; then
    COMPOSE=(docker compose)
  elif command -v docker-compose >/dev/null 2>&1; then
    COMPOSE=(docker-compose)
  else
    die "neither 'docker compose' nor docker-compose is installed (Debian: apt-get install docker-compose)"
  fi
}

compose() {
  [[ -f $STATE/compose.agents.yaml ]] || die "$STATE/compose.agents.yaml is missing: run 'deploy/local/stack.sh secrets' (or scripts/up.sh local) first"
  "${COMPOSE[@]}" -p "$PROJECT" --project-directory "$ROOT/deploy" -f "$ROOT/deploy/compose.yaml" \
    -f "$STATE/compose.agents.yaml" "$@"
}

devices() { local i; for ((i = 1; i <= AGENTS; i++)); do echo "edge-$i"; done; }

# ember-fleet's PKI command, as root in the fleet image (it has no shell), on $STATE.
pki() { docker run --rm --network none --user 0:0 -v "$STATE:/state" "ember-fleet:$VERSION" pki "$@" >/dev/null; }
# A root shell on $STATE (chown, chmod, rm of files owned by the containers' uids).
as_root() { docker run --rm --network none --user 0:0 -v "$STATE:/state" debian:bookworm-slim sh -euc "$1"; }

cmd_images() {
  need_docker
  local missing=()
  for i in "${IMAGES[@]}"; do docker image inspect "$i" >/dev/null 2>&1 || missing+=("$i"); done
  if [[ ${#missing[@]} -eq 0 ]]; then say "images present: ${IMAGES[*]}"; return; fi
  say "building missing images: ${missing[*]}"
  # amd64 always: IMAGES names the host's agent image whatever the platforms are.
  bash "$ROOT/deploy/build-images.sh" --arch "amd64,$PLATFORMS"
}

# ARM agents run under qemu-user through the kernel's binfmt_misc, with the interpreter opened
# at registration (flag F) so that it works inside a FROM-scratch container.
need_binfmt() {
  local p h
  for p in "${PLATFORM_LIST[@]}"; do
    case $p in arm64) h=qemu-aarch64 ;; armv7) h=qemu-arm ;; *) continue ;; esac
    grep -qs '^flags:.*F' "/proc/sys/fs/binfmt_misc/$h" ||
      die "EMBER_AGENT_PLATFORMS has $p, but this $(uname -m) host has no binfmt handler $h with flag F: install qemu-user-static and register it (bash scripts/install-deps.sh does both), or run $p agents on $p hardware"
  done
}

cmd_secrets() {
  need_docker
  for i in "ember-fleet:$VERSION" debian:bookworm-slim; do
    docker image inspect "$i" >/dev/null 2>&1 || die "image $i is missing: run 'deploy/local/stack.sh images' first"
  done
  mkdir -p "$STATE"
  chmod 0755 "$STATE"
  local moves="" id
  if [[ ! -f $STATE/pki/ca.pem ]]; then
    as_root "mkdir -p /state/pki /state/broker /state/fleet /state/agents /state/postgres && chmod 0700 /state/pki"
    pki init-ca --dir /state/pki --cn "Ember local stack CA"
  fi
  # The API's HTTPS certificate and the broker's: both from `pki server-cert`, which writes
  # server.pem/.key, moved to where their container reads them.
  if [[ ! -f $STATE/fleet/api.pem ]]; then
    pki server-cert --dir /state/pki --name fleet --name localhost
    as_root "mv /state/pki/server.pem /state/fleet/api.pem && mv /state/pki/server.key /state/fleet/api.key"
  fi
  if [[ ! -f $STATE/broker/server.pem ]]; then
    pki server-cert --dir /state/pki --name mosquitto
    as_root "mv /state/pki/server.pem /state/pki/server.key /state/broker/"
  fi
  if [[ ! -f $STATE/fleet/fleet.pem ]]; then
    pki client-cert --dir /state/pki
    as_root "mv /state/pki/fleet.pem /state/pki/fleet.key /state/fleet/"
  fi
  for id in $(devices); do
    [[ -f $STATE/agents/$id/device.pem ]] && continue
    pki device-cert --dir /state/pki --device-id "$id"
    moves+="mkdir -p /state/agents/$id && mv /state/pki/devices/$id.pem /state/agents/$id/device.pem && mv /state/pki/devices/$id.key /state/agents/$id/device.key && "
  done
  local pw_new="" token_new=""
  [[ -f $STATE/postgres/password ]] || pw_new=$(od -An -tx1 -N24 /dev/urandom | tr -d ' \n')
  [[ -f $STATE/fleet/fleet.toml ]] || token_new=$(docker run --rm --network none "ember-fleet:$VERSION" token generate)
  # One root shell: place the files, give each key to its reader, copy the CA certificate.
  as_root "${moves}
    for d in /state/broker /state/fleet /state/agents/*; do cp /state/pki/ca.pem \$d/ca.pem; chmod 0644 \$d/ca.pem; done
    if [ -n '$pw_new' ]; then umask 077; printf '%s\n' '$pw_new' >/state/postgres/password; fi
    if [ -n '$token_new' ]; then
      umask 077
      pw=\$(head -1 /state/postgres/password)
      cat >/state/fleet/fleet.toml <<EOF
# Generated by deploy/local/stack.sh: the fleet service of the local stack. Holds secrets.
data_dir = \"/var/lib/ember-fleet\"
bootstrap_token = \"$token_new\"

[log]
format = \"json\"

[http]
listen = \"0.0.0.0:8443\"

[http.tls]
cert_file = \"/etc/ember/api.pem\"
key_file = \"/etc/ember/api.key\"

[database]
url = \"postgres://ember:\$pw@postgres:5432/ember\"

[mqtt]
host = \"mosquitto\"
port = 8883

[mqtt.tls]
ca_file = \"/etc/ember/ca.pem\"
cert_file = \"/etc/ember/fleet.pem\"
key_file = \"/etc/ember/fleet.key\"
EOF
      printf '%s\n' '$token_new' >/state/admin-token
    fi
    chown $UID_BROKER:$UID_BROKER /state/broker/server.key
    chown $UID_FLEET:$UID_FLEET /state/fleet/api.key /state/fleet/fleet.key /state/fleet/fleet.toml
    chown $UID_POSTGRES:$UID_POSTGRES /state/postgres/password
    for k in /state/agents/*/device.key; do chown $UID_AGENT:$UID_AGENT \$k; done
    chmod 0600 /state/broker/server.key /state/fleet/*.key /state/fleet/fleet.toml /state/postgres/password /state/agents/*/device.key
    chmod 0755 /state/broker /state/fleet /state/agents /state/agents/* /state/postgres
    chown $(id -u):$(id -g) /state/admin-token"
  write_agents_compose
  say "secrets in $STATE (keys mode 0600, each owned by the uid of its container)"
}

# One service per device: its own certificate, its own queue volume.
write_agents_compose() {
  local f=$STATE/compose.agents.yaml.tmp id p
  {
    echo "# Generated by deploy/local/stack.sh for EMBER_AGENTS=$AGENTS EMBER_AGENT_PLATFORMS=$PLATFORMS: one agent per device certificate."
    echo "version: \"2.4\""
    echo "services:"
    for id in $(devices); do
      p=$(platform_of "$id")
      cat <<EOF
  agent-$id:
    image: $(agent_image "$p")
    platform: $(docker_platform "$p")
    read_only: true
    cap_drop: [ALL]
    security_opt: ["no-new-privileges:true"]
    restart: unless-stopped
    mem_limit: 256m
    depends_on:
      mosquitto: {condition: service_healthy}
    environment:
      EMBER_DEVICE_ID: $id
    volumes:
      - agent-$id:/var/lib/ember-agent
      - $STATE/agents/$id:/etc/ember/pki:ro
      - $ROOT/deploy/agent/agent.toml:/etc/ember/agent.toml:ro
      - $ROOT/models/bundles:/opt/ember/bundles:ro
      - $ROOT/models/keys/dev/dev.pub:/opt/ember/keys/dev.pub:ro
      - $ROOT/models/data:/opt/ember/data:ro
EOF
    done
    echo "volumes:"
    for id in $(devices); do echo "  agent-$id:"; done
  } >"$f"
  mv -f "$f" "$STATE/compose.agents.yaml"
}

cmd_start() {
  need_docker
  [[ -f $STATE/fleet/fleet.toml ]] || die "no secrets in $STATE: run 'deploy/local/stack.sh secrets' first"
  need_binfmt
  # Written again: EMBER_AGENT_PLATFORMS may have changed since the secrets step.
  write_agents_compose
  compose up -d --no-build --remove-orphans >&2
}

# The container of one service of the project (by compose's labels: faster than compose ps).
service_container() {
  docker ps -aq --filter "label=com.docker.compose.project=$PROJECT" \
    --filter "label=com.docker.compose.service=$1" | head -1
}

health_of() { docker inspect -f '{{if .State.Health}}{{.State.Health.Status}}{{else}}{{.State.Status}}{{end}}' "$1" 2>/dev/null || echo missing; }

cmd_wait() {
  need_docker
  local deadline=$((SECONDS + WAIT_S)) svc cid h pending
  while :; do
    pending=()
    for svc in postgres mosquitto fleet $(devices | sed 's/^/agent-/'); do
      cid=$(service_container "$svc")
      h=$([[ -n $cid ]] && health_of "$cid" || echo missing)
      [[ $h == healthy ]] || pending+=("$svc:$h")
    done
    if [[ ${#pending[@]} -eq 0 ]] && curl -fsS --max-time 5 --cacert "$STATE/fleet/ca.pem" \
      "https://localhost:$EMBER_HTTPS_PORT/api/v1/health" >/dev/null 2>&1; then
      say "healthy: fleet, broker, database and $AGENTS agents; the API answers on https://localhost:$EMBER_HTTPS_PORT"
      return
    fi
    if ((SECONDS >= deadline)); then
      compose ps >&2 || true
      compose logs --tail 30 >&2 || true
      die "not healthy after ${WAIT_S} s: ${pending[*]:-the API on https://localhost:$EMBER_HTTPS_PORT does not answer} (logs above; EMBER_WAIT_S raises the limit)"
    fi
    sleep 1
  done
}

cmd_token() {
  need_docker
  [[ -s $STATE/read-token ]] && { say "read token: $STATE/read-token"; return; }
  local cid token
  cid=$(service_container fleet)
  [[ -n $cid ]] || die "the fleet container is not running: run 'deploy/local/stack.sh start' first"
  token=$(docker exec "$cid" ember-fleet --config /etc/ember/fleet.toml token create --scope read --name local-stack 2>/dev/null) ||
    die "cannot create a read token in the fleet container (docker logs $cid)"
  (umask 077 && printf '%s\n' "$token" >"$STATE/read-token.tmp" && mv -f "$STATE/read-token.tmp" "$STATE/read-token")
  say "read token: $STATE/read-token"
}

cmd_outputs() {
  echo "dashboard_url=https://localhost:$EMBER_HTTPS_PORT/dashboard/"
  echo "api_url=https://localhost:$EMBER_HTTPS_PORT/api/v1"
  echo "ca_file=$STATE/fleet/ca.pem"
  echo "read_token_file=$STATE/read-token"
  echo "admin_token_file=$STATE/admin-token"
  echo "mqtt=mqtts://localhost:$EMBER_MQTT_PORT"
}

cmd_down() {
  need_docker
  if [[ -f $STATE/compose.agents.yaml ]]; then
    compose down --volumes --remove-orphans --timeout 20 >&2
  fi
  # Whatever a previous run with another EMBER_AGENTS or a lost state dir left: by label.
  local ids
  ids=$(docker ps -aq --filter "label=com.docker.compose.project=$PROJECT")
  [[ -z $ids ]] || docker rm -f $ids >/dev/null
  ids=$(docker volume ls -q --filter "label=com.docker.compose.project=$PROJECT")
  [[ -z $ids ]] || docker volume rm $ids >/dev/null
  ids=$(docker network ls -q --filter "label=com.docker.compose.project=$PROJECT")
  [[ -z $ids ]] || docker network rm $ids >/dev/null
  say "stack $PROJECT is down (containers, networks, volumes removed)"
}

cmd_clean() {
  [[ -d $STATE ]] || { say "no secrets to remove ($STATE does not exist)"; return; }
  need_docker
  # Files owned by the containers' uids: removed by root in a container, then the directory.
  as_root 'find /state -mindepth 1 -delete'
  rmdir "$STATE"
  # The default's parent (deploy/.state) too, when nothing else is in it.
  [[ $STATE != "$ROOT/deploy/.state/local" ]] || rmdir "$ROOT/deploy/.state" 2>/dev/null || true
  say "removed the generated secrets ($STATE)"
}

cmd_check_clean() {
  need_docker
  local left=()
  local c n v
  c=$(docker ps -a --filter "label=com.docker.compose.project=$PROJECT" --format '{{.Names}}')
  n=$(docker network ls --filter "label=com.docker.compose.project=$PROJECT" --format '{{.Name}}')
  v=$(docker volume ls --filter "label=com.docker.compose.project=$PROJECT" --format '{{.Name}}')
  [[ -z $c ]] || left+=("containers: $(echo $c)")
  [[ -z $n ]] || left+=("networks: $(echo $n)")
  [[ -z $v ]] || left+=("volumes: $(echo $v)")
  [[ ! -e $STATE ]] || left+=("secrets: $STATE")
  if [[ ${#left[@]} -gt 0 ]]; then
    printf 'stack: left behind: %s\n' "${left[@]}" >&2
    return 1
  fi
  say "nothing of $PROJECT is left (no container, network, volume or secret)"
}

case ${1:-} in
  images) cmd_images ;;
  secrets) cmd_secrets ;;
  start) cmd_start ;;
  wait) cmd_wait ;;
  token) cmd_token ;;
  outputs) cmd_outputs ;;
  up) cmd_images; cmd_secrets; cmd_start; cmd_wait; cmd_token; cmd_outputs ;;
  down) cmd_down ;;
  clean) cmd_clean ;;
  check-clean) cmd_check_clean ;;
  compose) shift; need_docker; compose "$@" ;;
  *) sed -n '2,20p' "$0" >&2; exit 2 ;;
esac
