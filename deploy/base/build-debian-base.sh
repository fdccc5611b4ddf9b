#!/usr/bin/env bash
# Builds the Debian base image that the Mosquitto and PostgreSQL images start FROM, from
# Debian's own packages, and names it the way Docker Hub does (debian:bookworm-slim), so the
# same Dockerfiles build here, where no container registry can be reached, and for a user who
# pulls the official image.
#
#   deploy/base/build-debian-base.sh          builds it unless an image with that name exists
#   deploy/base/build-debian-base.sh --force  rebuilds it
#
# Needs root (debootstrap creates device nodes and chroots), debootstrap, and a Debian mirror
# (EMBER_DEBIAN_MIRROR, default http://deb.debian.org/debian).
set -euo pipefail
IMAGE=${EMBER_BASE_IMAGE:-debian:bookworm-slim}
MIRROR=${EMBER_DEBIAN_MIRROR:-http://deb.debian.org/debian}

if [[ ${1:-} != --force ]] && docker image inspect "$IMAGE" >/dev/null 2>&1; then
  echo "build-debian-base: $IMAGE exists (pass --force to rebuild it)"
  exit 0
fi
command -v debootstrap >/dev/null 2>&1 || [[ -x /usr/sbin/debootstrap ]] || {
  echo "build-debian-base: debootstrap is missing: sudo apt-get install debootstrap (or bash scripts/install-deps.sh)" >&2
  exit 1
}
[[ $(id -u) == 0 ]] || { echo "build-debian-base: debootstrap needs root: run it with sudo" >&2; exit 1; }

rootfs=$(mktemp -d "${TMPDIR:-/tmp}/ember-rootfs.XXXXXX")
trap 'rm -rf "$rootfs"' EXIT
# minbase: dpkg, apt and essential packages only (what the slim image has).
PATH=$PATH:/usr/sbin debootstrap --variant=minbase bookworm "$rootfs" "$MIRROR" >"$rootfs.log" 2>&1 || {
  echo "build-debian-base: debootstrap failed; its log:" >&2; tail -30 "$rootfs.log" >&2; rm -f "$rootfs.log"; exit 1
}
rm -f "$rootfs.log"
# What the official slim image leaves out: apt lists and caches, docs and man pages.
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb \
  "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/*
# The same sources line and apt settings a container needs (no recommends, no docs).
echo "deb $MIRROR bookworm main" >"$rootfs/etc/apt/sources.list"
echo "deb $MIRROR bookworm-updates main" >>"$rootfs/etc/apt/sources.list"
printf 'APT::Install-Recommends "false";\nAPT::Install-Suggests "false";\n' >"$rootfs/etc/apt/apt.conf.d/90ember-slim"
printf 'path-exclude /usr/share/doc/*\npath-exclude /usr/share/man/*\npath-exclude /usr/share/info/*\n' \
  >"$rootfs/etc/dpkg/dpkg.cfg.d/90ember-slim"
tar --numeric-owner -C "$rootfs" -c . | docker import \
  --change 'CMD ["bash"]' --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --message "Debian bookworm minbase (debootstrap), built by deploy/base/build-debian-base.sh" \
  - "$IMAGE" >/dev/null
echo "build-debian-base: $IMAGE built from $MIRROR"
