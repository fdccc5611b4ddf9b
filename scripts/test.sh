#!/usr/bin/env bash
# Ember's whole test suite (the README's second command). On a fresh Debian 12 machine with the
# Rust toolchain it installs what it needs, then runs: format and lint checks, every host test
# (unit, property and system tests against real Mosquitto brokers, PostgreSQL clusters, the
# fleet's Python peers, an S3-compatible server and headless Chromium), the agent's and proto's
# unit tests for aarch64 under qemu-aarch64, and a no_std build of
# ember-proto for Cortex-M4F, the monitoring artefacts (alert rules with promtool, Grafana
# dashboards), the sensor-node firmware's tests (host and on-target in qemu-system-arm), the
# deployment files validated offline and the container images and local stack tested on the
# Docker Engine (deploy/tests/), and the agent's .deb in a systemd container. It ends with a
# plain "N passed, N failed" line.
set -uo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR=never
LOGS=target/test-logs
mkdir -p "$LOGS"
failed_steps=()

step() {
  local name=$1; shift
  echo "==> $name: $*"
  local t0=$SECONDS
  if "$@" 2>&1 | tee "$LOGS/$name.log"; then
    echo "==> $name: ok ($((SECONDS - t0)) s)"
  else
    echo "==> $name: FAILED ($((SECONDS - t0)) s)"
    failed_steps+=("$name")
  fi
}

bash scripts/install-deps.sh || { echo "0 passed, 1 failed"; exit 1; }

# The ARM and container builds (the aarch64 unit tests, the deploy-stack step's images and the
# .deb) use the release profile at opt-level 1: the same code with less of LLVM's time, which a
# cold CI run on 2 cores spends in minutes. They share one build per target: the aarch64 unit
# tests compile exactly the dependencies, features and flags of the arm64 image's agent
# (agent/Cargo.toml's ARM-only feature unification, .cargo/config.toml's crt-static), which
# deploy-stack then links without compiling them again. Run by hand, deploy/tests/stack-test.sh
# builds at the release profile's own opt-level 3. (Building them in the background at nice 19
# while the lint and host tests run was tried: on these 2 vCPUs it slowed the host build by
# 30 %, and the run was no shorter.)
CI_RELEASE=(env CARGO_PROFILE_RELEASE_OPT_LEVEL=1)
A64=aarch64-unknown-linux-gnu

step fmt cargo fmt --all -- --check
# One feature set for lint and tests: burn is built once, with its wgpu backend beside flex, so
# the wgpu golden vectors (models/tests/wgpu_golden.rs, the agent's
# `golden_vectors_of_every_committed_bundle_pass_on_wgpu`) run on Mesa's lavapipe in the same
# build as every other test. The agents the system tests spawn carry wgpu compiled in and serve
# on flex, the configured default (Ember never lets burn pick a device).
# The same set also turns on the test-only parts release builds leave out: the agent's and the
# fleet's fault hooks (`fault-injection`) and the fleet's `demo` (embedded broker, dev-signed
# bundles).
WGPU=(--features ember-models/wgpu,ember-agent/wgpu,ember-agent/fault-injection,ember-fleet/demo,ember-fleet/fault-injection)
step clippy cargo clippy --workspace --all-targets "${WGPU[@]}" -- -D warnings
# The README's demo build: ember-fleet without its default `cloud` feature (the cloud clients
# the demo never runs), linted so that the first command keeps building. Its features unify
# differently from the test build's (tokio, hyper, ...), so part of the graph is checked again
# (4 min 39 s measured after the step above).
step clippy-demo cargo clippy --locked -p ember-fleet --no-default-features --features demo --lib --bins -- -D warnings
step host-tests cargo test --workspace --no-fail-fast "${WGPU[@]}"
step thumbv7em-proto cargo build -p ember-proto --no-default-features --features alloc,node --target thumbv7em-none-eabihf
# The aarch64 unit tests under qemu-aarch64, built in the profile
# and with the flags of the arm64 image's agent.
step aarch64-tests "${CI_RELEASE[@]}" bash -c 'rc=0; cargo test --release --locked -p ember-agent --lib --no-fail-fast --target "$1" || rc=1; cargo test --release --locked -p ember-proto -p ember-ts --lib --no-fail-fast --target "$1" || rc=1; exit $rc' _ "$A64"
# armv7 (and aarch64) release builds of the agent, static, are linked and run under qemu in the
# deploy-stack step below: they are the ARM container images, and the armv7 agent streams
# through the local stack there.
# Alert rules (promtool check and unit tests), Grafana dashboards and provisioning, and every
# metric they name against the docs' generated metric tables (which host-tests keep equal to
# the code); it prints a cargo-style "test result:" line, counted below.
step monitoring python3 scripts/lint-monitoring.py
# The packaged systemd unit's hardening: exposure at most 2.0 (it scores 1.6).
step systemd-unit systemd-analyze security --offline=true --threshold=20 agent/debian/ember-agent.service
# The sensor-node firmware (firmware/, its own workspace): format and lint, the core's unit tests
# on the host, then the on-target tests on a Cortex-M4F in qemu-system-arm's mps2-an386 (one boot
# per test, through firmware/qemu-run.py). With `--features inference` the node runs the int8
# activity model itself (burn's no_std flex backend): linted, and its on-target test holds it to
# the bundle's golden vectors (a cold build of burn for thumbv7em adds minutes: docs/hil.md).
HOST_TRIPLE=$(rustc -vV | sed -n 's/^host: //p')
step firmware-fmt bash -c 'cd firmware && cargo fmt --all -- --check'
step firmware-clippy bash -c 'cd firmware && cargo clippy -p ember-node-mps2-an386 --lib --bins --test on_target -- -D warnings && cargo clippy -p ember-node-mps2-an386 --features inference --lib --bins --test on_target --test model_on_target -- -D warnings && cargo clippy -p ember-node --features inference -- -D warnings && cargo clippy -p ember-node --all-targets --target "$1" -- -D warnings' _ "$HOST_TRIPLE"
step firmware-tests bash -c 'cd firmware; rc=0; cargo test -p ember-node --target "$1" || rc=1; cargo test -p ember-node-mps2-an386 || rc=1; cargo test -p ember-node-mps2-an386 --features inference --test model_on_target || rc=1; exit $rc' _ "$HOST_TRIPLE"

# The container path (docs/deploy.md): offline validation of the Kubernetes manifests,
# Terraform and Dockerfiles, then the images built and the local stack tested on the real
# Docker Engine (terraform apply/destroy, outages, refused identities, up.sh/down.sh).
step deploy-validate bash deploy/tests/validate.sh
step deploy-stack "${CI_RELEASE[@]}" bash deploy/tests/stack-test.sh
# The agent's .deb (cargo-deb, from the static release binary deploy-stack built) installed in a
# container with systemd as PID 1: the unit reaches active, the watchdog restarts a frozen
# agent, an upgrade keeps the queue, purge removes it (agent/debian/tests/container.sh).
step deb-packaging "${CI_RELEASE[@]}" bash agent/debian/tests/container.sh



passed=0; failed=0
for f in "$LOGS"/host-tests.log "$LOGS"/aarch64-tests.log "$LOGS"/monitoring.log "$LOGS"/firmware-tests.log "$LOGS"/deploy-validate.log "$LOGS"/deploy-stack.log "$LOGS"/deb-packaging.log; do
  [ -f "$f" ] || continue
  while read -r p q; do passed=$((passed + p)); failed=$((failed + q)); done < <(
    sed -nE 's/^test result: [a-zA-Z]+\. ([0-9]+) passed; ([0-9]+) failed.*/\1 \2/p' "$f")
done
# A failed build or check step counts as a failure too.
for s in "${failed_steps[@]}"; do
  case "$s" in host-tests|aarch64-tests|monitoring|firmware-tests|deploy-validate|deploy-stack|deb-packaging) grep -q '^test result:' "$LOGS/$s.log" || failed=$((failed + 1)) ;; *) failed=$((failed + 1)) ;; esac
done
[ ${#failed_steps[@]} -gt 0 ] && echo "Failed steps: ${failed_steps[*]}"
echo "$passed passed, $failed failed"
[ ${#failed_steps[@]} -eq 0 ]
