#!/usr/bin/env bash
# Builds every Ember container image on this machine, with no container registry:
#
#   debian:bookworm-slim     the Debian base, from Debian's packages (deploy/base/), if missing
#   ember-fleet:VERSION      static musl ember-fleet FROM scratch          (deploy/fleet/)
#   ember-agent:VERSION      static musl ember-agent FROM scratch          (deploy/agent/)
#   ember-mosquitto:VERSION  Mosquitto, mutual TLS, ACL, identity plugin   (deploy/mosquitto/)
#   ember-postgres:15        PostgreSQL 15                                 (deploy/postgres/)
#
#   ember-agent:VERSION-arm64, ember-agent:VERSION-armv7
#                            the agent for ARM devices, FROM scratch around the static
#                            cross-compiled binary (--arch), platform linux/arm64, linux/arm/v7
#
#   deploy/build-images.sh [--only fleet,agent,mosquitto,postgres] [--arch amd64,arm64,armv7]
#
# --arch (default amd64, or $EMBER_IMAGE_ARCHS) chooses the agent's architectures: amd64 is
# `ember-agent:VERSION` (the host's; musl), arm64 and armv7 are built from
# aarch64-unknown-linux-gnu / armv7-unknown-linux-gnueabihf binaries linked statically
# (glibc, crt-static from .cargo/config.toml; Debian's cross gcc), tagged `-arm64` / `-armv7`. rustup ships no musl
# standard library for armv7, and glibc's allocator is the faster one for the models; glibc
# 2.36 resolves host names without NSS modules (no nsswitch.conf in the image: DNS, then
# /etc/hosts), which is all the agent needs. The
# classic builder keeps one platform per tag; a registry joins them into one multi-arch name
# (`docker manifest create ember-agent:VERSION ...-amd64 ...-arm64 ...-armv7`, docs/deploy.md).
# Running them here needs qemu-user-static's binfmt handlers (scripts/install-deps.sh).
#
# The binaries are compiled on the host (cargo, target x86_64-unknown-linux-musl, release);
# images contain no toolchain and no secret. Uses the classic builder (DOCKER_BUILDKIT=0): it
# takes local images as they are, where BuildKit would try to pull. Images are tagged with the
# workspace version only (no :latest), so a stack names exactly what it runs. Cached runs are
# fast: cargo and the docker layer cache skip what did not change. `--only mosquitto` needs the
# ember-fleet image (its PKI command writes the broker's configuration).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
export DOCKER_BUILDKIT=0
TARGET=x86_64-unknown-linux-musl
VERSION=$(sed -nE 's/^version = "([^"]+)"/\1/p' Cargo.toml | head -1)
REVISION=$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)
only=fleet,agent,mosquitto,postgres
archs=${EMBER_IMAGE_ARCHS:-amd64}
while [[ $# -gt 0 ]]; do
  case $1 in
    --only) only=${2:?--only needs a list, e.g. fleet,agent}; shift 2 ;;
    --arch) archs=${2:?--arch needs a list, e.g. amd64,arm64,armv7}; shift 2 ;;
    *) echo "build-images: unknown argument $1 (use --only LIST, --arch LIST)" >&2; exit 2 ;;
  esac
done

die() { echo "build-images: $*" >&2; exit 1; }
command -v docker >/dev/null 2>&1 || die "docker is missing: install Docker Engine (Debian: apt-get install docker.io)"
docker info >/dev/null 2>&1 || die "cannot reach the Docker Engine: is dockerd running, and may this user use it?"
want() { [[ ",$only," == *",$1,"* ]]; }
want_arch() { [[ ",$archs," == *",$1,"* ]]; }
for a in ${archs//,/ }; do
  case $a in amd64 | arm64 | armv7) ;; *) die "--arch $a: the agent's image architectures are amd64, arm64 and armv7" ;; esac
done
# The Rust target, docker platform and cross linker of each ARM architecture.
declare -A ARM_TARGET=([arm64]=aarch64-unknown-linux-gnu [armv7]=armv7-unknown-linux-gnueabihf)
declare -A ARM_PLATFORM=([arm64]=linux/arm64 [armv7]=linux/arm/v7)
declare -A ARM_GCC=([arm64]=aarch64-linux-gnu-gcc [armv7]=arm-linux-gnueabihf-gcc)
t0=$SECONDS
say() { echo "build-images: [$((SECONDS - t0)) s] $*"; }

bash deploy/base/build-debian-base.sh

ctx=${CARGO_TARGET_DIR:-$root/target}/images
if want fleet || want agent || want mosquitto; then
  command -v musl-gcc >/dev/null 2>&1 || die "musl-gcc is missing: apt-get install musl-tools (or bash scripts/install-deps.sh)"
  rustup target list --installed 2>/dev/null | grep -qx "$TARGET" ||
    die "the Rust target $TARGET is missing: rustup target add $TARGET"
  say "cargo build --release --target $TARGET -p ember-fleet -p ember-agent"
  # ring, SQLite (libsqlite3-sys) and zstd compile C: with musl-gcc, against musl.
  CC_x86_64_unknown_linux_musl=musl-gcc cargo build --release --locked --target "$TARGET" \
    -p ember-fleet -p ember-agent
  bin=${CARGO_TARGET_DIR:-$root/target}/$TARGET/release
  for b in ember-fleet ember-agent; do
    # A static binary runs FROM scratch: no interpreter, no shared library.
    if readelf -l "$bin/$b" | grep -q 'program interpreter'; then die "$bin/$b is not static"; fi
    mkdir -p "$ctx/${b#ember-}/state"
    # hard link or copy: the context holds the binary, the Dockerfile and an empty state dir.
    cp -f "$bin/$b" "$ctx/${b#ember-}/$b"
    touch "$ctx/${b#ember-}/state/.keep"
  done
fi

# The agent for ARM devices: one build per architecture, static, in the `device` profile
# (Cargo.toml: release plus fat LTO, one codegen unit and opt-level "s" outside the hot loops:
# a smaller binary for devices, a slower build; EMBER_AGENT_PROFILE=release trades that back). The amd64 image above shares the
# release build with the fleet.
profile=${EMBER_AGENT_PROFILE:-device}
if want agent; then
  for a in arm64 armv7; do
    want_arch "$a" || continue
    t=${ARM_TARGET[$a]}
    command -v "${ARM_GCC[$a]}" >/dev/null 2>&1 || die "${ARM_GCC[$a]} is missing: apt-get install gcc-${ARM_GCC[$a]%-gcc} (or bash scripts/install-deps.sh)"
    rustup target list --installed 2>/dev/null | grep -qx "$t" || die "the Rust target $t is missing: rustup target add $t"
    say "cargo build --profile $profile --target $t -p ember-agent"
    # .cargo/config.toml links both ARM targets statically (crt-static).
    cargo build --profile "$profile" --locked --target "$t" -p ember-agent
    b=${CARGO_TARGET_DIR:-$root/target}/$t/$profile/ember-agent
    if readelf -l "$b" | grep -q 'program interpreter'; then die "$b is not static"; fi
    mkdir -p "$ctx/agent-$a/state"
    cp -f "$b" "$ctx/agent-$a/ember-agent"
    touch "$ctx/agent-$a/state/.keep"
  done
fi

build() { # name context dockerfile [build args...]
  local name=$1 context=$2 file=$3; shift 3
  say "docker build $name"
  docker build -q -f "$file" -t "$name" \
    --build-arg "REVISION=$REVISION" "$@" "$context" >/dev/null 2>"$ctx/docker-build.err" || { cat "$ctx/docker-build.err" >&2; die "docker build $name failed"; }
}
want fleet && build "ember-fleet:$VERSION" "$ctx/fleet" deploy/fleet/Dockerfile --build-arg "VERSION=$VERSION"
want agent && want_arch amd64 && build "ember-agent:$VERSION" "$ctx/agent" deploy/agent/Dockerfile --build-arg "VERSION=$VERSION"
for a in arm64 armv7; do
  want agent && want_arch "$a" || continue
  build "ember-agent:$VERSION-$a" "$ctx/agent-$a" deploy/agent/Dockerfile --build-arg "VERSION=$VERSION" \
    --platform "${ARM_PLATFORM[$a]}"
done
want mosquitto && build "ember-mosquitto:$VERSION" deploy/mosquitto deploy/mosquitto/Dockerfile \
  --build-arg "VERSION=$VERSION" --build-arg "FLEET_IMAGE=ember-fleet:$VERSION"
want postgres && build "ember-postgres:15" deploy/postgres deploy/postgres/Dockerfile
# A rebuilt image leaves its predecessor untagged: remove those of ours (never anything else).
docker image prune -f --filter "label=org.opencontainers.image.source=https://github.com/ember-edge/ember" >/dev/null
say "done"
docker image ls --format '{{.Repository}}:{{.Tag}}\t{{.Size}}' | grep -E '^(ember-|debian:bookworm-slim)' || true
