#!/usr/bin/env bash
# System tests of the container path, against the real Docker Engine (a step of
# scripts/test.sh): the images are built, the local stack comes up through
# `terraform apply` (terraform/local), agents' records reach PostgreSQL through Mosquitto with
# mutual TLS, the fleet survives a 20 s kill and an agent a 30 s network cut with 0 records
# lost, foreign certificates and foreign topics are refused inside the stack, `terraform
# destroy` leaves nothing behind, and `scripts/up.sh local` / `scripts/down.sh local` do the
# same as one command each.
#
#   bash deploy/tests/stack-test.sh [TEST...]     (default: all, in order; they share a stack)
#
# The stack runs under its own compose project, free ports and a temporary state directory,
# so it never touches a stack a user runs. Waits poll a condition with a timeout; the only
# fixed waits are the outages the tests are about (20 s, 30 s). Ends with a cargo-style
# "test result:" line that scripts/test.sh counts. Needs root (or the docker group) and what
# scripts/install-deps.sh installs; terraform must be on PATH.
set -uo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$ROOT"
WORK=$(mktemp -d /tmp/ember-stack-test.XXXXXX)
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
export EMBER_STATE_DIR=$WORK/state
export EMBER_COMPOSE_PROJECT=ember-stacktest-$$
export EMBER_HTTPS_PORT=$(free_port)
export EMBER_MQTT_PORT=$(free_port)
# Three agents, one per architecture the agent ships for: edge-1 amd64 (the host's),
# edge-2 arm64 and edge-3 armv7, each in its own image, the ARM ones under qemu-user-static.
export EMBER_AGENTS=3
export EMBER_AGENT_PLATFORMS=amd64,arm64,armv7
export EMBER_IMAGE_ARCHS=$EMBER_AGENT_PLATFORMS
# The ARM agents in the test's images are built in the release profile, which the fleet's build
# has mostly compiled already; the `device` profile (fat LTO) that ships to devices would add a
# cold, single-threaded link per architecture to every CI run and tests nothing more here.
export EMBER_AGENT_PROFILE=${EMBER_AGENT_PROFILE:-release}
DEVICES=(edge-1 edge-2 edge-3)
export EMBER_WAIT_S=240
export TF_DATA_DIR=$WORK/tf-data
export TF_IN_AUTOMATION=1
PROJECT=$EMBER_COMPOSE_PROJECT
NET=${PROJECT}_default
STACK=(bash "$ROOT/deploy/local/stack.sh")
TF=(terraform -chdir="$ROOT/terraform/local")
TFVARS=(-var "state_dir=$EMBER_STATE_DIR" -var "project=$PROJECT" -var "agents=$EMBER_AGENTS"
  -var 'agent_platforms=["amd64","arm64","armv7"]'
  -var "https_port=$EMBER_HTTPS_PORT" -var "mqtt_port=$EMBER_MQTT_PORT" -state="$WORK/terraform.tfstate")
API=https://localhost:$EMBER_HTTPS_PORT/api/v1
TIMINGS=$ROOT/target/test-logs/deploy-timings.txt
mkdir -p "$(dirname "$TIMINGS")"
: >"$TIMINGS"

fail() { echo "FAIL: $*" >&2; return 1; }
timing() { echo "$1 $2" >>"$TIMINGS"; echo "timing: $1 $2 s"; }
# wait_for SECONDS DESCRIPTION COMMAND...: polls COMMAND (every 0.5 s) until it succeeds.
wait_for() {
  local limit=$1 what=$2; shift 2
  local deadline=$((SECONDS + limit))
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < deadline)) || { fail "timed out after ${limit} s waiting for $what"; return 1; }
    sleep 0.5
  done
}
cid() { "${STACK[@]}" compose ps -q "$1" 2>/dev/null; }
health() { docker inspect -f '{{if .State.Health}}{{.State.Health.Status}}{{else}}{{.State.Status}}{{end}}' "$1" 2>/dev/null; }
is_healthy() { [[ $(health "$1") == healthy ]]; }
api() { curl -fsS --max-time 10 --cacert "$EMBER_STATE_DIR/fleet/ca.pem" -H "Authorization: Bearer $(cat "$EMBER_STATE_DIR/read-token")" "$API$1"; }
psql_q() { docker exec "$(cid postgres)" psql -U ember -d ember -tAc "$1"; }
# The ledger of DEVICE: "received captured lost pending" summed over its streams.
ledger() { api "/devices/$1/ledger" | jq -r '[([.streams[].received]|add), ([.streams[].captured]|add), .lost_count, ([.streams[].pending_count]|add)] | @tsv'; }
lost_is_zero() { local l; l=$(ledger "$1") || return 1; [[ $(cut -f3 <<<"$l") == 0 ]]; }
# DEVICE has stored at least N records (telemetry and inference results) and lost none.
received_at_least() { local l; l=$(ledger "$1") || return 1; (($(cut -f1 <<<"$l") >= $2)) && [[ $(cut -f3 <<<"$l") == 0 ]]; }
telemetry_rows() { psql_q "SELECT count(*) FROM telemetry WHERE device_id = '$1'"; }
rows_at_least() { local n; n=$(telemetry_rows "$1") && ((n >= $2)); }

# --- the tests --------------------------------------------------------------------------------

test_images_build() {
  local t0=$SECONDS
  bash deploy/build-images.sh || return 1
  timing images-build-first $((SECONDS - t0))
  t0=$SECONDS
  bash deploy/build-images.sh >/dev/null || return 1
  timing images-build-cached $((SECONDS - t0))
  local v img user
  v=$(sed -nE 's/^version = "([^"]+)"/\1/p' Cargo.toml | head -1)
  for img in "ember-fleet:$v" "ember-agent:$v" "ember-mosquitto:$v" ember-postgres:15; do
    user=$(docker image inspect -f '{{.Config.User}}' "$img") || return 1
    [[ -n $user && $user != 0* && $user != root* ]] || fail "$img runs as root (User=$user)" || return 1
    [[ -n $(docker image inspect -f '{{if .Config.Healthcheck}}yes{{end}}' "$img") ]] || fail "$img has no health check" || return 1
    [[ $(docker image inspect -f '{{index .Config.Labels "org.opencontainers.image.title"}}' "$img") == "${img%%:*}" ]] ||
      fail "$img lacks its OCI title label" || return 1
    echo "image $img: $(docker image inspect -f '{{.Size}}' "$img") bytes, user $user"
    echo "image-size $img $(docker image inspect -f '{{.Size}}' "$img")" >>"$TIMINGS"
  done
  # The binaries images are FROM scratch: one layer, nothing but the binary and an empty dir.
  for img in "ember-fleet:$v" "ember-agent:$v" "ember-agent:$v-arm64" "ember-agent:$v-armv7"; do
    [[ $(docker image inspect -f '{{len .RootFS.Layers}}' "$img") -le 2 ]] || fail "$img is not FROM scratch" || return 1
  done
  # The ARM agent images: their platform, a static binary of their architecture, the same
  # user, health check and labels as the amd64 one; and they run (under qemu-user-static).
  local a platform dplat machine c out
  for a in arm64 armv7; do
    img=ember-agent:$v-$a
    case $a in
      arm64) platform="linux arm64 " dplat=linux/arm64 machine="ARM aarch64" ;;
      armv7) platform="linux arm v7" dplat=linux/arm/v7 machine="ARM, EABI5" ;;
    esac
    [[ $(docker image inspect -f '{{.Os}} {{.Architecture}} {{.Variant}}' "$img") == "$platform" ]] ||
      fail "$img has platform '$(docker image inspect -f '{{.Os}} {{.Architecture}} {{.Variant}}' "$img")', not '$platform'" || return 1
    [[ $(docker image inspect -f '{{.Config.User}}' "$img") == 10002:10002 ]] || fail "$img does not run as 10002" || return 1
    [[ -n $(docker image inspect -f '{{if .Config.Healthcheck}}yes{{end}}' "$img") ]] || fail "$img has no health check" || return 1
    [[ $(docker image inspect -f '{{index .Config.Labels "org.opencontainers.image.title"}}' "$img") == ember-agent ]] ||
      fail "$img lacks its OCI title label" || return 1
    c=$(docker create --platform "$dplat" "$img") || return 1
    c=${c%%$'\n'*}
    rm -rf "$WORK/bin-$a"; mkdir -p "$WORK/bin-$a"
    docker cp "$c:/usr/local/bin/ember-agent" "$WORK/bin-$a/ember-agent" >/dev/null; docker rm "$c" >/dev/null
    out=$(file -b "$WORK/bin-$a/ember-agent")
    [[ $out == *"$machine"* && $out == *static* ]] || fail "$img carries '$out', not a static $machine binary" || return 1
    out=$(docker run --rm --network none --platform "$dplat" "$img" --version 2>&1) || fail "$img does not run: $out" || return 1
    echo "image $img: $(docker image inspect -f '{{.Size}}' "$img") bytes, runs as '$out', $(cut -d, -f1-2 <<<"$(file -b "$WORK/bin-$a/ember-agent")")"
    echo "image-size $img $(docker image inspect -f '{{.Size}}' "$img")" >>"$TIMINGS"
  done
}

test_terraform_apply_brings_the_stack_up() {
  "${TF[@]}" init -input=false >/dev/null || return 1
  local t0=$SECONDS
  "${TF[@]}" apply -input=false -auto-approve "${TFVARS[@]}" || return 1
  timing terraform-apply $((SECONDS - t0))
  local url token_file
  url=$("${TF[@]}" output -state="$WORK/terraform.tfstate" -raw dashboard_url) || return 1
  token_file=$("${TF[@]}" output -state="$WORK/terraform.tfstate" -raw read_token_file) || return 1
  [[ $url == "https://localhost:$EMBER_HTTPS_PORT/dashboard/" ]] || fail "dashboard_url is $url" || return 1
  [[ -s $token_file && $(stat -c %a "$token_file") == 600 ]] || fail "read token file $token_file missing or not 0600" || return 1
  # No private key or password in the Terraform state: only paths.
  ! grep -qE 'PRIVATE KEY|postgres://' "$WORK/terraform.tfstate" || fail "the Terraform state holds a secret" || return 1
  local k
  for k in "$EMBER_STATE_DIR"/broker/server.key "$EMBER_STATE_DIR"/fleet/*.key "$EMBER_STATE_DIR"/agents/*/device.key \
    "$EMBER_STATE_DIR"/pki/ca.key "$EMBER_STATE_DIR"/postgres/password "$EMBER_STATE_DIR"/fleet/fleet.toml; do
    [[ $(stat -c %a "$k") == 600 ]] || fail "$k has mode $(stat -c %a "$k"), not 0600" || return 1
  done
}

test_records_reach_postgres_through_mutual_tls() {
  local d
  for d in "${DEVICES[@]}"; do
    wait_for 120 "telemetry of $d in PostgreSQL" rows_at_least "$d" 50 || return 1
    echo "$d: $(telemetry_rows "$d") telemetry rows, $(psql_q "SELECT count(*) FROM inference WHERE device_id = '$d'") inference results in PostgreSQL"
  done
  # They came over the TLS listener, authenticated by certificate (the broker's own log).
  local log
  log=$(docker logs "$(cid mosquitto)" 2>&1)
  grep -q "Opening ipv4 listen socket on port 8883" <<<"$log" || fail "the broker has no 8883 listener" || return 1
  ! grep -q "listen socket on port 1883" <<<"$log" || fail "the broker opened a plaintext listener" || return 1
  grep -qE "New client connected from .* as edge-1 .*u'edge-1'" <<<"$log" || fail "no certificate-authenticated connection of edge-1 in the broker log" || return 1
  # A plaintext MQTT client gets nowhere.
  ! timeout 10 mosquitto_pub -h localhost -p "$EMBER_MQTT_PORT" -t ember/v1/edge-1/telemetry -m x -q 1 2>/dev/null ||
    fail "a plaintext client could publish" || return 1
}

test_dashboard_answers_over_https() {
  local code
  code=$(curl -sS -o /dev/null -w '%{http_code}' --cacert "$EMBER_STATE_DIR/fleet/ca.pem" "https://localhost:$EMBER_HTTPS_PORT/dashboard/") || return 1
  [[ $code == 200 ]] || fail "the dashboard answered $code" || return 1
  api /health | jq -e '.status == "ok" and .database == "ok" and .mqtt == "subscribed"' >/dev/null || fail "health is not ok: $(api /health)" || return 1
  api /devices | jq -e '[.items[].device_id] | index("edge-1") and index("edge-2") and index("edge-3")' >/dev/null ||
    fail "the fleet does not list edge-1, edge-2 and edge-3: $(api /devices)" || return 1
  ! curl -fsS --max-time 5 "http://localhost:$EMBER_HTTPS_PORT/api/v1/health" >/dev/null 2>&1 || fail "the API answers plain HTTP" || return 1
}

test_fleet_killed_for_20s_loses_nothing() {
  local fleet before d
  fleet=$(cid fleet)
  declare -A captured
  for d in "${DEVICES[@]}"; do captured[$d]=$(ledger "$d" | cut -f2); done
  docker kill "$fleet" >/dev/null || return 1
  [[ $(docker inspect -f '{{.State.Running}}' "$fleet") == false ]] || fail "the fleet still runs after docker kill" || return 1
  before=$(telemetry_rows edge-1)
  sleep 20 # the outage under test: agents keep capturing and queue
  [[ $(docker inspect -f '{{.State.Running}}' "$fleet") == false ]] || fail "the fleet came back during the outage" || return 1
  docker start "$fleet" >/dev/null || return 1
  wait_for 120 "the fleet healthy again" is_healthy "$fleet" || return 1
  # Everything captured up to the end of the outage arrives (20 s at 20 Hz is 400 samples per
  # device, plus their inference results), and the ledger explains every sequence number.
  for d in "${DEVICES[@]}"; do
    wait_for 180 "$d's records of the outage stored, 0 lost" received_at_least "$d" $((captured[$d] + 400)) || { echo "ledger $d: $(ledger "$d")"; return 1; }
    echo "ledger $d (received captured lost pending): $(ledger "$d")"
  done
  (($(telemetry_rows edge-1) > before + 300)) || fail "edge-1's outage records did not reach PostgreSQL" || return 1
}

test_agent_cut_off_for_30s_drains_its_backlog() {
  local agent ip queued captured_before received_before l
  agent=$(cid agent-edge-2)
  l=$(ledger edge-2)
  received_before=$(cut -f1 <<<"$l")
  docker network disconnect "$NET" "$agent" || return 1
  sleep 30 # the outage under test: the agent keeps capturing into its queue
  [[ $(docker inspect -f '{{.State.Running}}' "$agent") == true ]] || fail "the agent stopped while cut off" || return 1
  l=$(ledger edge-2)
  # Nothing of the outage reached the fleet (it was really cut off).
  (($(cut -f1 <<<"$l") < received_before + 200)) || fail "edge-2 kept delivering while disconnected: $l" || return 1
  docker network connect --alias agent-edge-2 "$NET" "$agent" || return 1
  ip=$(docker inspect -f "{{(index .NetworkSettings.Networks \"$NET\").IPAddress}}" "$agent")
  # Its queue held the backlog (30 s at 20 Hz: 600 samples and their results)...
  queued=$(curl -fsS --max-time 5 "http://$ip:9898/metrics" | sed -nE 's/^ember_agent_queue_records(\{[^}]*\})? ([0-9.e+]+)$/\2/p' | head -1)
  echo "edge-2 queue after reconnecting: ${queued:-?} records"
  # ... which drains: the fleet stores everything captured during the cut, 0 lost...
  wait_for 180 "edge-2's backlog stored, 0 lost" received_at_least edge-2 $((received_before + 600)) || { echo "ledger edge-2: $(ledger edge-2)"; return 1; }
  # ... and the agent's queue is back to its steady state (a few batches).
  queue_small() { local q; q=$(curl -fsS --max-time 5 "http://$ip:9898/metrics" | sed -nE 's/^ember_agent_queue_records(\{[^}]*\})? ([0-9]+)$/\2/p' | head -1); [[ -n $q ]] && ((q < 200)); }
  wait_for 120 "edge-2's queue drained" queue_small || return 1
  echo "ledger edge-2 (received captured lost pending): $(ledger edge-2)"
}

test_foreign_ca_device_is_refused() {
  local v dir c
  v=$(sed -nE 's/^version = "([^"]+)"/\1/p' Cargo.toml | head -1)
  dir=$WORK/foreign
  mkdir -p "$dir/pki" "$dir/device"
  # A CA the stack does not trust, and a device certificate from it.
  docker run --rm --network none --user 0:0 -v "$dir:/f" "ember-fleet:$v" pki init-ca --dir /f/pki --cn "Foreign CA" >/dev/null || return 1
  docker run --rm --network none --user 0:0 -v "$dir:/f" "ember-fleet:$v" pki device-cert --dir /f/pki --device-id intruder-1 >/dev/null || return 1
  docker run --rm --network none --user 0:0 -v "$dir:/f" debian:bookworm-slim sh -euc \
    'cp /f/pki/devices/intruder-1.pem /f/device/device.pem; cp /f/pki/devices/intruder-1.key /f/device/device.key
     chown 10002:10002 /f/device/device.key; chmod 600 /f/device/device.key' || return 1
  # It trusts the stack's CA (it wants to reach this broker) but presents the foreign certificate.
  cp "$EMBER_STATE_DIR/fleet/ca.pem" "$dir/device/ca.pem"
  c=$(docker run -d --name "$PROJECT-intruder" --network "$NET" --read-only -e EMBER_DEVICE_ID=intruder-1 \
    -v "$dir/device:/etc/ember/pki:ro" -v "$ROOT/deploy/agent/agent.toml:/etc/ember/agent.toml:ro" \
    -v "$ROOT/models/bundles:/opt/ember/bundles:ro" -v "$ROOT/models/keys/dev/dev.pub:/opt/ember/keys/dev.pub:ro" \
    -v "$ROOT/models/data:/opt/ember/data:ro" --tmpfs /var/lib/ember-agent:uid=10002,gid=10002 "ember-agent:$v") || return 1
  broker_refused() { docker logs "$(cid mosquitto)" 2>&1 | grep -qiE "certificate verify failed|unknown ca|OpenSSL Error"; }
  wait_for 60 "the broker to refuse the foreign certificate" broker_refused || { docker logs --tail 20 "$c"; docker rm -f "$c" >/dev/null; return 1; }
  docker logs "$(cid mosquitto)" 2>&1 | grep -iE "certificate verify failed|unknown ca|OpenSSL Error" | tail -2
  # It keeps being refused, and the fleet never hears of it.
  wait_for 30 "the intruder to retry" bash -c "[[ \$(docker logs $(cid mosquitto) 2>&1 | grep -ciE 'certificate verify failed|OpenSSL Error') -ge 2 ]]" || { docker rm -f "$c" >/dev/null; return 1; }
  docker rm -f "$c" >/dev/null
  [[ $(psql_q "SELECT count(*) FROM devices WHERE device_id = 'intruder-1'") == 0 ]] || fail "intruder-1 reached the fleet" || return 1
  [[ $(psql_q "SELECT count(*) FROM telemetry WHERE device_id = 'intruder-1'") == 0 ]] || fail "intruder-1's records reached PostgreSQL" || return 1
}

test_cross_device_topic_and_client_id_are_refused() {
  local v dir out
  v=$(sed -nE 's/^version = "([^"]+)"/\1/p' Cargo.toml | head -1)
  dir=$WORK/probe
  mkdir -p "$dir"
  # A genuine device certificate of this stack's CA, for a device that runs no agent.
  docker run --rm --network none --user 0:0 -v "$EMBER_STATE_DIR:/state" "ember-fleet:$v" pki device-cert --dir /state/pki --device-id edge-probe >/dev/null || return 1
  docker run --rm --network none --user 0:0 -v "$EMBER_STATE_DIR:/state" -v "$dir:/p" debian:bookworm-slim sh -euc \
    "cp /state/pki/devices/edge-probe.pem /state/pki/devices/edge-probe.key /p/; chown $(id -u) /p/edge-probe.key" || return 1
  local tls=(-h localhost -p "$EMBER_MQTT_PORT" --cafile "$EMBER_STATE_DIR/fleet/ca.pem" --cert "$dir/edge-probe.pem" --key "$dir/edge-probe.key" -V mqttv5 -q 1)
  # Control: its own topic is allowed.
  out=$(timeout 20 mosquitto_pub "${tls[@]}" -i edge-probe -t ember/v1/edge-probe/heartbeat -m '{}' 2>&1) ||
    fail "edge-probe could not publish to its own topic: $out" || return 1
  # Another device's topic: the broker answers PUBACK "not authorised" and delivers nothing.
  out=$(timeout 20 mosquitto_pub "${tls[@]}" -i edge-probe -t ember/v1/edge-1/telemetry -m '{"forged":true}' 2>&1)
  grep -qi "not authori" <<<"$out" || fail "publishing to edge-1's topic was not refused: $out" || return 1
  echo "cross-device publish: $out"
  # Another device's client id: refused at CONNECT, and edge-1's agent stays connected.
  out=$(timeout 20 mosquitto_pub "${tls[@]}" -i edge-1 -t ember/v1/edge-probe/heartbeat -m '{}' 2>&1)
  grep -qi "not authori" <<<"$out" || fail "connecting as edge-1 with edge-probe's certificate was not refused: $out" || return 1
  echo "foreign client id: $out"
  ! docker logs "$(cid mosquitto)" 2>&1 | grep -q "Client edge-1 already connected, closing old connection" ||
    fail "the broker evicted edge-1's connection" || return 1
  [[ $(psql_q "SELECT count(*) FROM rejects WHERE device_id = 'edge-1'") == 0 ]] || fail "the forged message reached the fleet" || return 1
}

test_up_sh_is_idempotent_on_a_running_stack() {
  local before after t0=$SECONDS
  before=$(docker ps -q --filter "label=com.docker.compose.project=$PROJECT" | sort)
  bash scripts/up.sh local || return 1
  timing up-warm $((SECONDS - t0))
  after=$(docker ps -q --filter "label=com.docker.compose.project=$PROJECT" | sort)
  [[ $before == "$after" ]] || fail "up.sh on a running stack replaced containers" || return 1
}

test_terraform_destroy_leaves_nothing() {
  local t0=$SECONDS
  "${TF[@]}" destroy -input=false -auto-approve "${TFVARS[@]}" || return 1
  timing terraform-destroy $((SECONDS - t0))
  "${STACK[@]}" check-clean || return 1
  [[ -z $(docker ps -aq --filter "name=$PROJECT") ]] || fail "containers named $PROJECT are left" || return 1
}

test_up_sh_and_down_sh_local() {
  local t0=$SECONDS
  bash scripts/up.sh local || return 1
  timing up-cold-images-cached $((SECONDS - t0))
  wait_for 120 "edge-1's telemetry in PostgreSQL" rows_at_least edge-1 20 || return 1
  t0=$SECONDS
  bash scripts/down.sh local || return 1
  timing down $((SECONDS - t0))
  bash scripts/down.sh local || fail "down.sh on a stack that is down failed" || return 1
  "${STACK[@]}" check-clean
}

# --- runner -----------------------------------------------------------------------------------

ALL=(images_build terraform_apply_brings_the_stack_up records_reach_postgres_through_mutual_tls
  dashboard_answers_over_https fleet_killed_for_20s_loses_nothing agent_cut_off_for_30s_drains_its_backlog
  foreign_ca_device_is_refused cross_device_topic_and_client_id_are_refused up_sh_is_idempotent_on_a_running_stack
  terraform_destroy_leaves_nothing up_sh_and_down_sh_local)
TESTS=("${@:-${ALL[@]}}")
[[ $# -gt 0 ]] || TESTS=("${ALL[@]}")

missing=()
for t in docker terraform jq curl mosquitto_pub python3; do command -v "$t" >/dev/null 2>&1 || missing+=("$t"); done
docker compose version >/dev/null 2>&1 || command -v docker-compose >/dev/null 2>&1 || missing+=(docker-compose)
if [[ ${#missing[@]} -gt 0 ]]; then
  echo "stack-test: missing ${missing[*]}: run bash scripts/install-deps.sh (terraform: it ships with the machine image; https://developer.hashicorp.com/terraform/install)" >&2
  echo "test result: FAILED. 0 passed; ${#TESTS[@]} failed; 0 ignored"
  exit 1
fi

cleanup() {
  docker rm -f "$PROJECT-intruder" >/dev/null 2>&1
  "${STACK[@]}" down >/dev/null 2>&1
  "${STACK[@]}" clean >/dev/null 2>&1
  # The temporary work dir holds files owned by the containers' uids.
  docker run --rm --network none -v "$WORK:/w" debian:bookworm-slim sh -c 'find /w -mindepth 1 -delete' >/dev/null 2>&1
  rm -rf "$WORK"
}
trap cleanup EXIT

passed=0 failed=0 failures=()
for t in "${TESTS[@]}"; do
  echo "--- test stack::$t"
  t0=$SECONDS
  if (set -o pipefail; "test_$t"); then
    echo "test stack::$t ... ok ($((SECONDS - t0)) s)"
    passed=$((passed + 1))
  else
    echo "test stack::$t ... FAILED ($((SECONDS - t0)) s)"
    failed=$((failed + 1)); failures+=("$t")
    cid fleet >/dev/null 2>&1 && "${STACK[@]}" compose logs --tail 15 2>&1 | tail -60
  fi
done
[[ $failed -eq 0 ]] || echo "failures: ${failures[*]}"
echo "deploy timings (s) and image sizes (bytes):"; cat "$TIMINGS"
if [[ $failed -eq 0 ]]; then
  echo "test result: ok. $passed passed; 0 failed; 0 ignored"
else
  echo "test result: FAILED. $passed passed; $failed failed; 0 ignored"
  exit 1
fi
