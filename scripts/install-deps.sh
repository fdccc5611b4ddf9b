#!/usr/bin/env bash
# Installs what Ember's tests need on Debian 12 (run as root, or with sudo available):
# the Mosquitto broker and what its ember_identity plugin is built with, PostgreSQL 15,
# RabbitMQ (its AMQP 1.0 plugin), Mesa
# lavapipe (software Vulkan), the fleet's Python test peers, Chromium and Python's playwright,
# promtool and PyYAML for the monitoring checks, qemu-user, qemu-system-arm (the firmware's
# tests) and the gcc cross linkers, the Rust cross targets, and for the container path Docker
# Engine, compose, debootstrap, musl-tools and the deployment validators; Java and Google's
# Pub/Sub emulator (the GCP bridge tests); RabbitMQ (the Event Hubs transport test); cargo-deb
# for the packaging.
set -euo pipefail

need_apt=()
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || need_apt+=(mosquitto)
command -v mosquitto_sub >/dev/null 2>&1 || need_apt+=(mosquitto-clients)
# The ember_identity Mosquitto plugin (deploy/mosquitto/, built by scripts/build-identity-plugin.sh
# for every TLS broker the tests start): gcc, the broker's plugin headers and OpenSSL's.
command -v gcc >/dev/null 2>&1 || need_apt+=(gcc)
[ -f /usr/include/mosquitto_broker.h ] || need_apt+=(mosquitto-dev)
[ -f /usr/include/mosquitto.h ] || need_apt+=(libmosquitto-dev)
[ -f /usr/include/openssl/x509.h ] || need_apt+=(libssl-dev)
command -v qemu-aarch64 >/dev/null 2>&1 || need_apt+=(qemu-user)
# The ARM agent images run in the local stack's tests under qemu-user-static, through binfmt
# handlers registered below.
[ -x /usr/libexec/qemu-binfmt/aarch64-binfmt-P ] || need_apt+=(qemu-user-static)
# The systemd unit's hardening check (systemd-analyze security --offline).
command -v systemd-analyze >/dev/null 2>&1 || need_apt+=(systemd)
# The firmware's on-target tests and the HIL tests boot it in qemu-system-arm's mps2-an386.
command -v qemu-system-arm >/dev/null 2>&1 || need_apt+=(qemu-system-arm)
command -v aarch64-linux-gnu-gcc >/dev/null 2>&1 || need_apt+=(gcc-aarch64-linux-gnu libc6-dev-arm64-cross)
command -v arm-linux-gnueabihf-gcc >/dev/null 2>&1 || need_apt+=(gcc-arm-linux-gnueabihf libc6-dev-armhf-cross)
# PostgreSQL 15 server programs for the fleet's throwaway test clusters (initdb, pg_ctl).
[ -x /usr/lib/postgresql/15/bin/initdb ] || need_apt+=(postgresql-15)
# RabbitMQ with its AMQP 1.0 plugin (rabbitmq_amqp1_0 ships in the package): the real AMQP 1.0
# broker the Event Hubs source's transport is tested against (ember_testkit::TestRabbitMq runs
# a private node per test; Debian also starts a system-wide one where an init system runs,
# which the tests never use).
[ -x /usr/lib/rabbitmq/bin/rabbitmq-server ] || need_apt+=(rabbitmq-server)
# Chromium for the fleet dashboard's browser tests (fleet-api/tests/it/browser.rs), driven by
# Python's playwright (below); no Node.js or npm.
[ -x /usr/bin/chromium ] || need_apt+=(chromium)
# promtool (Debian ships it in the prometheus package): checks and unit-tests the alert rules in
# deploy/prometheus/ (scripts/lint-monitoring.py). Where an init system runs, the package also
# starts a Prometheus server on 9090; nothing in the tests uses it.
command -v promtool >/dev/null 2>&1 || need_apt+=(prometheus)
# Mesa's lavapipe (software Vulkan) and the Vulkan loader: the models' wgpu golden test runs on it.
compgen -G '/usr/share/vulkan/icd.d/lvp_icd.*.json' >/dev/null || need_apt+=(mesa-vulkan-drivers libvulkan1)
# The container path (deploy/, docs/deploy.md): Docker Engine and compose, debootstrap for the
# Debian base image, musl-gcc for the static binaries, curl and jq for the stack tests.
command -v docker >/dev/null 2>&1 || need_apt+=(docker.io)
docker compose version >/dev/null 2>&1 || command -v docker-compose >/dev/null 2>&1 || need_apt+=(docker-compose)
command -v debootstrap >/dev/null 2>&1 || [ -x /usr/sbin/debootstrap ] || need_apt+=(debootstrap)
command -v musl-gcc >/dev/null 2>&1 || need_apt+=(musl-tools)
command -v curl >/dev/null 2>&1 || need_apt+=(curl)
command -v jq >/dev/null 2>&1 || need_apt+=(jq)
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || need_apt+=(python3-venv)
# Java for the Google Pub/Sub emulator (below).
command -v java >/dev/null 2>&1 || need_apt+=(openjdk-17-jre-headless)

if [ ${#need_apt[@]} -gt 0 ]; then
  echo "install-deps: installing ${need_apt[*]}"
  SUDO=""
  if [ "$(id -u)" != 0 ]; then
    command -v sudo >/dev/null 2>&1 || { echo "install-deps: need root or sudo to apt-get install ${need_apt[*]}" >&2; exit 1; }
    SUDO=sudo
  fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi
# The Google Pub/Sub emulator for the GCP bridge and Pub/Sub source tests
# (fleet-api/tests/it/pubsub.rs, ember_testkit::TestPubSub): Google's
# google-cloud-cli-pubsub-emulator package, which Debian does not ship. Installed from Google's
# apt repository where one is configured; otherwise this stops here, saying so (the tests would
# fail the same way: nothing is skipped).
pubsub_emulator() {
  local sdk
  sdk=$(gcloud info --format='value(installation.sdk_root)' 2>/dev/null || true)
  for d in /usr/lib/google-cloud-sdk /usr/share/google-cloud-sdk ${sdk:+"$sdk"}; do
    [ -x "$d/platform/pubsub-emulator/bin/cloud-pubsub-emulator" ] && return 0
  done
  return 1
}
if ! pubsub_emulator; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  if apt-cache policy google-cloud-cli-pubsub-emulator 2>/dev/null | grep -q 'Candidate: [0-9]'; then
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends google-cloud-cli-pubsub-emulator >/dev/null
  fi
  pubsub_emulator || {
    echo "install-deps: the Pub/Sub emulator is missing: install google-cloud-cli-pubsub-emulator from Google's apt repository (https://cloud.google.com/sdk/docs/install#deb) or run \`gcloud components install pubsub-emulator\`" >&2
    exit 1
  }
fi
# The Docker Engine (deploy/tests/stack-test.sh, the .deb test): machines start it before a run;
# where it is not running (no systemd, or it was stopped), it is started here.
if ! docker info >/dev/null 2>&1 && command -v dockerd >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  echo "install-deps: the Docker Engine is not running: starting dockerd (log: /tmp/ember-dockerd.log)"
  $SUDO setsid dockerd >/tmp/ember-dockerd.log 2>&1 </dev/null &
  for _ in $(seq 1 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
  docker info >/dev/null 2>&1 || { echo "install-deps: dockerd did not start; see /tmp/ember-dockerd.log" >&2; exit 1; }
fi
# binfmt_misc handlers for ARM binaries with flag F (the interpreter is opened now, so it also
# runs inside FROM-scratch containers): what systemd-binfmt does at boot where systemd runs.
for h in aarch64 arm; do
  [ -e "/proc/sys/fs/binfmt_misc/qemu-$h" ] && continue
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  [ -e /proc/sys/fs/binfmt_misc/register ] || $SUDO mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc ||
    { echo "install-deps: cannot mount binfmt_misc: the ARM agent images cannot run on this host" >&2; exit 1; }
  $SUDO sh -c "cat /usr/lib/binfmt.d/qemu-$h.conf > /proc/sys/fs/binfmt_misc/register"
done
# Debian starts a system-wide broker on 1883 when it installs mosquitto where an init system
# runs; the tests never use it (each starts its own on an ephemeral port).

# Python peers of the fleet tests: paho-mqtt (an independent MQTT client), schemathesis,
# moto (an S3-compatible server for the registry) and playwright (drives /usr/bin/chromium in
# the browser tests; its wheel carries its own driver: never `playwright install`),
# at the pinned versions (a quick no-op when they are already installed).
python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore -r fleet-api/tests/python/requirements.txt
# PyYAML for scripts/lint-monitoring.py (reads the alert rules and Grafana provisioning files).
python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore -r scripts/requirements.txt

# The deployment validators (checkov, kubernetes-validate, yamllint), pinned, in their own
# virtual environment: checkov's pins would fight the fleet test peers' (deploy/tests/validate.sh).
DEPLOY_VENV=${EMBER_DEPLOY_VENV:-$HOME/.cache/ember/deploy-venv}
if ! cmp -s deploy/tests/requirements.txt "$DEPLOY_VENV/requirements.txt"; then
  python3 -m venv "$DEPLOY_VENV"
  "$DEPLOY_VENV/bin/pip" install -q --disable-pip-version-check -r deploy/tests/requirements.txt
  cp deploy/tests/requirements.txt "$DEPLOY_VENV/requirements.txt"
fi
# Terraform and kubectl come with the machine image (neither is a Debian package): say so early.
command -v terraform >/dev/null 2>&1 || echo "install-deps: terraform is missing (the deploy tests need it; https://developer.hashicorp.com/terraform/install)" >&2
command -v kubectl >/dev/null 2>&1 || echo "install-deps: kubectl is missing (the deploy validation renders kustomize with it; https://kubernetes.io/docs/tasks/tools/)" >&2

installed=$(rustup target list --installed)
# x86_64-unknown-linux-musl: the static ember-fleet and ember-agent of the container images.
for t in aarch64-unknown-linux-gnu armv7-unknown-linux-gnueabihf thumbv7em-none-eabihf x86_64-unknown-linux-musl; do
  grep -qx "$t" <<<"$installed" || rustup target add "$t"
done
# Packaging (agent/debian/): cargo-deb builds the agent's .deb (the packaging test in
# scripts/test.sh), ≈ 2 minutes to build once on 2 cores. scripts/release.sh installs
# cargo-cyclonedx (the release's SBOM, ≈ 4 minutes) itself: the tests do not need it.
command -v cargo-deb >/dev/null 2>&1 || cargo install --locked cargo-deb
