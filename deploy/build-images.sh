#!/usr/bin/env bash
# Builds every Ember container image on this machine, with no container registry:
#
#   debian:bookworm-slim     the Debian base, from Debian's packages (deploy/base/), if missing
#   ember-fleet:VERSION      static musl ember-fleet FROM scratch          (deploy/fleet/)
#   ember-agent:VERSION      static musl ember-agent FROM scratch          (deploy/agent/)
#   ember-mosquitto:VERSION  Mosquitto, mutual TLS, ACL, identity plugin   (deploy/mosquitto/)
#   ember-postgres:15        PostgreSQL 15                                 (deploy/postgres/)
#
#   deploy/build-images.sh [--only fleet,agent,mosquitto,postgres]
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
[[ ${1:-} == --only ]] && only=${2:?--only needs a list, e.g. fleet,agent}

die() { echo "build-images: $*" >&2; exit 1; }
command -v docker >/dev/null 2>&1 || die "docker is missing: install Docker Engine (Debian: apt-get install docker.io)"
docker info >/dev/null 2>&1 || die "cannot reach the Docker Engine: is dockerd running, and may this user use it?"
want() { [[ ",$only," == *",$1,"* ]]; }
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

build() { # name context dockerfile [build args...]
  local name=$1 context=$2 file=$3; shift 3
  say "docker build $name"
  docker build -q -f "$file" -t "$name" \
    --build-arg "REVISION=$REVISION" "$@" "$context" >/dev/null 2>"$ctx/docker-build.err" || { cat "$ctx/docker-build.err" >&2; die "docker build $name failed"; }
}
want fleet && build "ember-fleet:$VERSION" "$ctx/fleet" deploy/fleet/Dockerfile --build-arg "VERSION=$VERSION"
want agent && build "ember-agent:$VERSION" "$ctx/agent" deploy/agent/Dockerfile --build-arg "VERSION=$VERSION"
want mosquitto && build "ember-mosquitto:$VERSION" deploy/mosquitto deploy/mosquitto/Dockerfile \
  --build-arg "VERSION=$VERSION" --build-arg "FLEET_IMAGE=ember-fleet:$VERSION"
want postgres && build "ember-postgres:15" deploy/postgres deploy/postgres/Dockerfile
# A rebuilt image leaves its predecessor untagged: remove those of ours (never anything else).
docker image prune -f --filter "label=org.opencontainers.image.source=https://github.com/ember-edge/ember" >/dev/null
say "done"
docker image ls --format '{{.Repository}}:{{.Tag}}\t{{.Size}}' | grep -E '^(ember-|debian:bookworm-slim)' || true
