#!/usr/bin/env bash
# The ember-agent .deb in a Debian bookworm container with systemd as PID 1 (Docker Engine):
#
#   agent/debian/tests/container.sh OLD.deb NEW.deb
#   agent/debian/tests/container.sh            (builds both from the static musl release binary)
#   EMBER_DEB_PROFILE=dev agent/debian/tests/container.sh   (from target/debug/ember-agent)
#
# OLD and NEW are the same architecture as this machine, NEW the higher version. Without
# arguments the script packages ${CARGO_TARGET_DIR:-target}/x86_64-unknown-linux-musl/release/
# ember-agent (which deploy/build-images.sh builds for the container images; built here if
# missing) twice with cargo-deb, as VERSION-1 and VERSION-2: the same binary, so the upgrade
# test exercises the package's maintainer scripts and the unit's state, not a code change. Checks, each
# printed as a libtest line and summed in a cargo-style "test result:" line at the end:
#   1. OLD installs, the unit is enabled and reaches `active` (READY=1 over sd_notify), the
#      keys directory is root-only (0700), `systemd-analyze verify` passes on the installed unit;
#   2. the watchdog restarts a frozen agent (SIGSTOP; WatchdogSec shortened to 3 s by a drop-in);
#   3. an upgrade to NEW keeps the queue: records queued while no broker answers are all still
#      queued after `dpkg -i NEW` restarted the agent, and the edited conffile is kept;
#   4. `dpkg --purge` removes the queue and the keys.
#
# Needs docker and the debian:bookworm-slim base (deploy/base/build-debian-base.sh builds it
# from Debian's packages; this script calls it). The container runs systemd with the flags that
# work on these machines (--privileged does not): SYS_ADMIN, seccomp unconfined, the host's
# cgroup namespace and a writable /sys/fs/cgroup.
set -uo pipefail
root="$(cd "$(dirname "$0")/../../.." && pwd)"
if [[ $# -eq 0 ]]; then
  command -v cargo-deb >/dev/null 2>&1 || { echo "deb-container: cargo-deb is missing: cargo install --locked cargo-deb (or bash scripts/install-deps.sh)" >&2; echo "test result: FAILED. 0 passed; 1 failed; 0 ignored"; exit 1; }
  T=x86_64-unknown-linux-musl
  bin=${CARGO_TARGET_DIR:-$root/target}/$T/release/ember-agent
  # EMBER_DEB_PROFILE=dev packages the test build's target/debug/ember-agent instead (glibc,
  # stripped by cargo-deb): a quick local run that needs no release build.
  deb_args=(--target $T)
  if [[ ${EMBER_DEB_PROFILE:-} == dev ]]; then
    deb_args=(--profile dev --strip --fast)
  elif [[ ! -x $bin ]]; then
    (cd "$root" && CC_x86_64_unknown_linux_musl=musl-gcc cargo build --release --locked --target $T -p ember-agent) ||
      { echo "test result: FAILED. 0 passed; 1 failed; 0 ignored"; exit 1; }
  fi
  v=$(sed -nE 's/^version = "([^"]+)"/\1/p' "$root/Cargo.toml" | head -1)
  out=${CARGO_TARGET_DIR:-$root/target}/deb-test
  rm -rf "$out"; mkdir -p "$out/old" "$out/new"
  for n in 1 2; do
    d=$out/old; [[ $n == 2 ]] && d=$out/new
    (cd "$root" && cargo deb -p ember-agent "${deb_args[@]}" --no-build --deb-version "$v-$n" -o "$d/" >/dev/null) ||
      { echo "test result: FAILED. 0 passed; 1 failed; 0 ignored"; exit 1; }
  done
  set -- "$out"/old/*.deb "$out"/new/*.deb
  ls -l "$@"
fi
old=${1:?usage: container.sh OLD.deb NEW.deb}
new=${2:?usage: container.sh OLD.deb NEW.deb}
IMAGE=ember-systemd-test:bookworm
WAIT=60
export DOCKER_BUILDKIT=0

die() { echo "deb-container: $*" >&2; echo "test result: FAILED. 0 passed; 1 failed; 0 ignored"; exit 1; }
command -v docker >/dev/null 2>&1 || die "docker is missing: install Docker Engine (Debian: apt-get install docker.io)"
[[ -f $old && -f $new ]] || die "no such .deb: $old / $new"
bash "$root/deploy/base/build-debian-base.sh" >/dev/null || die "the debian:bookworm-slim base could not be built"
docker build -q -t "$IMAGE" "$root/agent/debian/tests" >/dev/null || die "building $IMAGE failed"

debs=$(mktemp -d "${TMPDIR:-/tmp}/ember-debs.XXXXXX")
cp "$old" "$debs/old.deb" && cp "$new" "$debs/new.deb"
chmod -R a+rX "$debs"
name=ember-deb-test-$$
cleanup() { docker rm -f "$name" >/dev/null 2>&1; rm -rf "$debs"; }
trap cleanup EXIT
docker run -d --name "$name" --cap-add SYS_ADMIN --security-opt seccomp=unconfined \
  --cgroupns=host -v /sys/fs/cgroup:/sys/fs/cgroup:rw --tmpfs /run --tmpfs /run/lock \
  -v "$debs:/debs:ro" "$IMAGE" >/dev/null || die "cannot start the systemd container"

ct() { docker exec "$name" "$@"; }
# Polls a command in the container until it succeeds or $WAIT seconds pass.
until_ok() {
  local deadline=$((SECONDS + WAIT))
  until ct bash -c "$1" >/dev/null 2>&1; do
    ((SECONDS < deadline)) || return 1
    sleep 0.2
  done
}
metric() { # name (without ember_agent_) -> value from the agent's metrics endpoint (bash's /dev/tcp: no curl needed)
  # Lines are `ember_agent_NAME{device="..."} VALUE`.
  ct bash -c 'exec 3<>/dev/tcp/127.0.0.1/9898 && printf "GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n" >&3 && cat <&3' 2>/dev/null |
    awk -v m="ember_agent_$1" '$1 == m || index($1, m "{") == 1 { print $2; exit }'
}
passed=0; failed=0
check() { # name, then a command that must succeed
  local n=$1; shift
  if "$@"; then echo "test deb::$n ... ok"; passed=$((passed + 1))
  else echo "test deb::$n ... FAILED"; failed=$((failed + 1))
    ct journalctl -u ember-agent --no-pager -n 30 2>/dev/null | sed 's/^/    /'
  fi
}

until_ok 'systemctl is-system-running | grep -Eq "running|degraded"' || die "systemd did not boot in the container"

# 1. Install: enabled, active, keys root-only, the unit verifies.
install_active() {
  ct dpkg -i /debs/old.deb >/dev/null || return 1
  ct systemctl is-enabled ember-agent >/dev/null || return 1
  until_ok 'systemctl is-active ember-agent' || return 1
  [[ $(ct stat -c '%a %U' /etc/ember/keys) == "700 root" ]] || return 1
  ct systemd-analyze verify --man=no /lib/systemd/system/ember-agent.service
}
check installs_and_the_unit_reaches_active install_active

# 2. The watchdog restarts a frozen agent.
watchdog_restarts() {
  ct mkdir -p /etc/systemd/system/ember-agent.service.d
  ct bash -c 'printf "[Service]\nWatchdogSec=3s\nTimeoutAbortSec=5s\n" >/etc/systemd/system/ember-agent.service.d/watchdog.conf'
  ct systemctl daemon-reload && ct systemctl restart ember-agent || return 1
  until_ok 'systemctl is-active ember-agent' || return 1
  local pid; pid=$(ct systemctl show -p MainPID --value ember-agent)
  [[ $pid =~ ^[1-9][0-9]*$ ]] || return 1
  ct bash -c "kill -STOP $pid" || return 1
  until_ok "p=\$(systemctl show -p MainPID --value ember-agent); [ \"\$p\" != $pid ] && [ \"\$p\" != 0 ] && systemctl is-active ember-agent" || return 1
  # (not `| grep -q`: under pipefail, journalctl's SIGPIPE would fail the check)
  [[ $(ct journalctl -u ember-agent --no-pager) == *'Watchdog timeout'* ]]
}
check the_watchdog_restarts_a_frozen_agent watchdog_restarts

# 3. An upgrade keeps the queue (and the edited conffile).
upgrade_keeps_queue() {
  # Records accumulate: a simulated IMU, and no broker on 127.0.0.1:1883.
  ct bash -c 'cat >/etc/ember/agent.toml <<EOF
device_id = "deb-test"
[mqtt]
host = "127.0.0.1"
port = 1883
[shutdown]
grace_ms = 500
[[source]]
type = "sim"
stream = "imu"
rate_hz = 500
channels = 3
[metrics]
listen = "127.0.0.1:9898"
EOF'
  ct systemctl restart ember-agent || return 1
  local deadline=$((SECONDS + WAIT)) q=0
  until (( ${q%.*} >= 1000 )); do
    ((SECONDS < deadline)) || return 1
    sleep 0.2; q=$(metric queue_records); q=${q:-0}
  done
  # No new records from here on (a serial device that is not there), so the count is exact.
  ct sed -i 's/^type = "sim"/type = "serial"\ndevice = "\/dev\/ttyACM9"/; /^rate_hz/d' /etc/ember/agent.toml
  ct systemctl restart ember-agent || return 1
  until_ok 'systemctl is-active ember-agent' || return 1
  local before; before=$(metric queue_records); echo "    queue_records before the upgrade: ${before:-none}"
  [[ -n $before ]] && (( ${before%.*} >= 1000 )) || return 1
  ct dpkg -i --force-confold /debs/new.deb >/dev/null || return 1
  [[ $(ct dpkg-query -W -f '${Version}' ember-agent) == "$(dpkg-deb -f "$new" Version)" ]] || return 1
  until_ok 'systemctl is-active ember-agent' || return 1
  local after=""; deadline=$((SECONDS + WAIT))
  until [[ -n $after ]]; do ((SECONDS < deadline)) || return 1; sleep 0.2; after=$(metric queue_records); done
  echo "    queue_records: $before before the upgrade, $after after; queue_resets_total $(metric queue_resets_total)"
  [[ $after == "$before" && $(metric queue_resets_total) == 0 ]] || return 1
  ct grep -q 'device = "/dev/ttyACM9"' /etc/ember/agent.toml
}
check an_upgrade_keeps_the_queue_and_the_config upgrade_keeps_queue

# 4. Purge removes the queue and the keys.
purge_removes_state() {
  ct rm -rf /etc/systemd/system/ember-agent.service.d
  ct dpkg --purge ember-agent >/dev/null || return 1
  ! ct test -e /var/lib/private/ember-agent && ! ct test -e /etc/ember/keys && ! ct systemctl cat ember-agent >/dev/null 2>&1
}
check purge_removes_the_queue_and_the_keys purge_removes_state

status=ok; ((failed == 0)) || status=FAILED
echo "test result: $status. $passed passed; $failed failed; 0 ignored"
((failed == 0))
