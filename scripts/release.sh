#!/usr/bin/env bash
# Release artefacts of the edge agent, for amd64, arm64 and armhf:
#
#   scripts/release.sh [--out DIR] [--targets "TRIPLE ..."] [--deb-version V]
#
# Writes to DIR (default target/release-artefacts/VERSION):
#   ember-agent-VERSION-<arch>              static, stripped binary of the `device` profile (Cargo.toml:
#                                           release plus fat LTO, one codegen unit and opt-level "s" outside the hot loops; it strips)
#   ember-agent_VERSION-1_<arch>.deb        the package (cargo-deb; agent/Cargo.toml's metadata)
#   ember-agent-VERSION-<arch>.cdx.json     CycloneDX 1.5 SBOM of what each binary is built from
#                                           (cargo-cyclonedx, then cut down to `cargo tree`'s
#                                           graph of that target: see the SBOM step below)
#   SHA256SUMS                              sha256 of every file above
#   SHA256SUMS.sig                          ed25519 signature of SHA256SUMS (OpenSSL), when a
#                                           key is given (below); without one the script says
#                                           so and exits 1 after writing everything else
#
# The signing key is an ed25519 private key in PEM (`openssl genpkey -algorithm ed25519`): a
# file named by EMBER_RELEASE_KEY_FILE, or the PEM text itself in EMBER_RELEASE_KEY (for CI
# secrets; the script puts that text in a 0600 temporary file it deletes on exit). Never commit
# it. Verify with
#   openssl pkeyutl -verify -pubin -inkey release.pub.pem -rawin -in SHA256SUMS -sigfile SHA256SUMS.sig
#   sha256sum -c SHA256SUMS
#
# Cross builds use Debian's cross gcc (gcc-aarch64-linux-gnu, gcc-arm-linux-gnueabihf, set up
# in .cargo/config.toml; scripts/install-deps.sh installs them), not `cross`: Cross.toml's
# images live in a container registry that CI machines cannot reach. Tools from crates.io:
# cargo-deb (scripts/install-deps.sh installs it) and cargo-cyclonedx (installed here on first
# use: only releases need it, so the test machines do not spend minutes building it).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
VERSION=$(sed -nE 's/^version = "([^"]+)"/\1/p' Cargo.toml | head -1)
targets="x86_64-unknown-linux-gnu aarch64-unknown-linux-gnu armv7-unknown-linux-gnueabihf"
out=""
deb_version=""
while [[ $# -gt 0 ]]; do
  case $1 in
    --out) out=$2; shift 2 ;;
    --targets) targets=$2; shift 2 ;;
    --deb-version) deb_version=$2; shift 2 ;;
    *) echo "release: unknown argument $1 (see the header of $0)" >&2; exit 2 ;;
  esac
done
tgt=${CARGO_TARGET_DIR:-$root/target}
out=${out:-$tgt/release-artefacts/$VERSION}
die() { echo "release: $*" >&2; exit 1; }
command -v cargo-deb >/dev/null 2>&1 || die "cargo-deb is missing: cargo install --locked cargo-deb (or bash scripts/install-deps.sh)"
command -v cargo-cyclonedx >/dev/null 2>&1 || cargo install --locked cargo-cyclonedx || die "cargo-cyclonedx is missing and could not be installed: cargo install --locked cargo-cyclonedx"
command -v openssl >/dev/null 2>&1 || die "openssl is missing: apt-get install openssl"
t0=$SECONDS
say() { echo "release: [$((SECONDS - t0)) s] $*"; }

arch_of() {
  case $1 in
    x86_64-unknown-linux-gnu) echo amd64 ;;
    aarch64-unknown-linux-gnu) echo arm64 ;;
    armv7-unknown-linux-gnueabihf) echo armhf ;;
    *) die "no Debian architecture for $1 (supported: x86_64/aarch64/armv7 linux-gnu)" ;;
  esac
}

rm -rf "$out"
mkdir -p "$out"
for t in $targets; do
  arch=$(arch_of "$t")
  rustup target list --installed 2>/dev/null | grep -qx "$t" || die "the Rust target $t is missing: rustup target add $t"
  say "cargo build --profile device --locked -p ember-agent --target $t"
  # Linked statically on every architecture (glibc inside; .cargo/config.toml does it for the
  # ARM targets): no shared library to map, 1.1 MiB less resident memory on a device
  # (docs/benchmarks.md), and no dependency on the device's libc version. `--target` keeps the
  # flag off build scripts and proc macros.
  tv=${t//-/_}
  env "CARGO_TARGET_${tv^^}_RUSTFLAGS=-C target-feature=+crt-static" \
    cargo build --profile device --locked -p ember-agent --target "$t"
  bin=$tgt/$t/device/ember-agent
  if readelf -l "$bin" | grep -q 'program interpreter'; then die "$bin is not linked statically"; fi
  # profile.device strips at link time: refuse a binary that still has a symbol table.
  if readelf -S "$bin" | grep -q '\.symtab'; then die "$bin is not stripped"; fi
  cp "$bin" "$out/ember-agent-$VERSION-$arch"
  say "cargo deb --target $t ($arch)"
  cargo deb -p ember-agent --target "$t" --profile device --no-build --no-strip ${deb_version:+--deb-version "$deb_version"} \
    -o "$out/" >/dev/null
  # The cross .deb's dependency line names the architecture (libc6:arm64): it must be the
  # package's own.
  deb=$(ls "$out"/ember-agent_*_"$arch".deb)
  [[ $(dpkg-deb -f "$deb" Architecture) == "$arch" ]] || die "$deb is not $arch"
done

say "cargo cyclonedx (SBOM per target)"
sbom_dir=$(mktemp -d)
trap 'rm -rf "$sbom_dir"' EXIT
# cargo-cyclonedx 0.5 (flags checked against `cargo cyclonedx --help` of 0.5.9):
# * it writes one file next to EVERY workspace member's Cargo.toml, whatever --manifest-path
#   says: the agent's is moved into $out, the others deleted;
# * it lists optional dependencies of dependencies whose features are off (burn-cuda, burn-tch,
#   wgpu, ...: 553 crates for aarch64 where the binary links 250; upstream issue
#   CycloneDX/cyclonedx-rust-cargo#766), so its components and graph are cut down to the
#   crates `cargo tree -e normal` says the target's build uses. Build dependencies are left
#   out (--no-build-deps): they are not in the binary.
for t in $targets; do
  arch=$(arch_of "$t")
  name="ember-agent-$VERSION-$arch.cdx"
  cargo cyclonedx --manifest-path agent/Cargo.toml --format json --spec-version 1.5 \
    --no-build-deps --target "$t" --override-filename "$name" -q
  mv "agent/$name.json" "$sbom_dir/$name.json"
  find "$root" -name "$name.json" -not -path "$tgt/*" -delete
  cargo tree --locked -p ember-agent --target "$t" -e normal --prefix none --format '{p}' \
    | sed -E 's/ \(.*$//; s/ v/ /' | sort -u >"$sbom_dir/$arch.tree"
  python3 - "$sbom_dir/$name.json" "$sbom_dir/$arch.tree" "$out/$name.json" <<'PY'
import json, sys
bom = json.load(open(sys.argv[1]))
used = {tuple(l.split(" ", 1)) for l in open(sys.argv[2]).read().splitlines() if l}
keep = [c for c in bom.get("components", []) if (c["name"], c.get("version")) in used]
refs = {c["bom-ref"] for c in keep} | {bom["metadata"]["component"]["bom-ref"]}
bom["components"] = keep
bom["dependencies"] = [
    {**d, "dependsOn": [r for r in d.get("dependsOn", []) if r in refs]}
    for d in bom.get("dependencies", []) if d["ref"] in refs
]
missing = len(used) - len(keep) - 1  # the agent itself is the metadata component
if missing > 0:
    sys.exit(f"release: the SBOM lacks {missing} crates cargo tree lists")
json.dump(bom, open(sys.argv[3], "w"), indent=1)
print(f"release: SBOM {sys.argv[3]}: {len(keep)} crates")
PY
done

say "SHA256SUMS"
(cd "$out" && sha256sum -- * >SHA256SUMS)
key_file=${EMBER_RELEASE_KEY_FILE:-}
if [[ -z $key_file && -n ${EMBER_RELEASE_KEY:-} ]]; then
  key_file=$sbom_dir/release.key
  (umask 077 && printf '%s\n' "$EMBER_RELEASE_KEY" >"$key_file")
fi
if [[ -z $key_file ]]; then
  ls -l "$out"
  die "no signing key: set EMBER_RELEASE_KEY_FILE (a PEM ed25519 key file) or EMBER_RELEASE_KEY (its text); SHA256SUMS is unsigned"
fi
openssl pkeyutl -sign -inkey "$key_file" -rawin -in "$out/SHA256SUMS" -out "$out/SHA256SUMS.sig"
openssl pkey -in "$key_file" -pubout -out "$out/release.pub.pem"
openssl pkeyutl -verify -pubin -inkey "$out/release.pub.pem" -rawin -in "$out/SHA256SUMS" \
  -sigfile "$out/SHA256SUMS.sig" >/dev/null || die "the signature does not verify"
say "done: $out"
ls -l "$out"
