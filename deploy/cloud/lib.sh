# Shared steps of deploy/cloud/gcp.sh and azure.sh (sourced, not run). Each step is idempotent:
# it creates what is missing and leaves what exists.
#
# Secrets never pass through Terraform: the PKI (ember-fleet pki, in the fleet image), the
# bootstrap token and the database password (GCP) are files under $STATE (mode 0600), and reach
# the cluster as Kubernetes Secrets created with kubectl from those files.

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VERSION=$(sed -nE 's/^version = "([^"]+)"/\1/p' "$ROOT/Cargo.toml" | head -1)
NAMESPACE=${EMBER_NAMESPACE:-ember}
WAIT_S=${EMBER_WAIT_S:-600}

die() { echo "$TAG: $*" >&2; exit 1; }
say() { echo "$TAG: $*" >&2; }

# need TOOL HOW-TO-INSTALL
need() { command -v "$1" >/dev/null 2>&1 || die "$1 is not installed: $2"; }

need_common_tools() {
  need terraform "install Terraform 1.5 or later (https://developer.hashicorp.com/terraform/install)"
  need kubectl "install kubectl (https://kubernetes.io/docs/tasks/tools/)"
  need docker "install Docker Engine: the images are built locally (deploy/build-images.sh) and pushed"
  need openssl "install openssl (it generates the bootstrap token)"
}

# The operator's public address as a /32, for the control plane's allow list, unless given.
operator_cidrs() { # ENV-VALUE
  if [[ -n $1 ]]; then echo "$1"; return; fi
  local ip
  ip=$(curl -fsS --max-time 10 https://api.ipify.org 2>/dev/null) ||
    die "cannot find your public address for the cluster API's allow list: set $2 (e.g. 203.0.113.7/32, comma-separated for several)"
  [[ $ip =~ ^[0-9]+\.[0-9]+\.[0-9]+\.[0-9]+$ ]] || die "unexpected public address '$ip': set $2"
  echo "$ip/32"
}

# A comma-separated CIDR list as an HCL list: ["a","b"].
hcl_list() { local IFS=,; local a=($1) out="" x; for x in "${a[@]}"; do out+="\"$x\","; done; echo "[${out%,}]"; }

tf() { terraform -chdir="$TF_DIR" "$@"; }

tf_init() {
  say "terraform init ($TF_DIR)"
  tf init -input=false -upgrade=false >/dev/null || die "terraform init failed in $TF_DIR (the provider comes from registry.terraform.io: internet access needed)"
}

# A secret file: created once (mode 0600), kept afterwards.
secret_file() { # PATH GENERATOR...
  local f=$1; shift
  [[ -s $f ]] && return
  (umask 077 && "$@" >"$f")
}

need_image() {
  docker image inspect "$1" >/dev/null 2>&1 && return
  say "image $1 is missing: building the images (deploy/build-images.sh)"
  bash "$ROOT/deploy/build-images.sh"
}

# ember-fleet pki in the fleet image, on $STATE/pki, as the invoking user.
pki() { docker run --rm --network none --user "$(id -u):$(id -g)" -v "$STATE/pki:/pki" "ember-fleet:$VERSION" pki "$@" >/dev/null; }

# The PKI: CA, the fleet's API certificate and MQTT client certificate, and (GCP) the broker's
# certificate for the given names. Existing files are kept (a CA is never replaced by up).
make_pki() { # BROKER-NAMES...
  need_image "ember-fleet:$VERSION"
  mkdir -p "$STATE/pki" "$STATE/fleet" "$STATE/broker"
  chmod 0700 "$STATE/pki" "$STATE/fleet" "$STATE/broker"
  if [[ ! -f $STATE/pki/ca.pem ]]; then
    say "creating the fleet CA ($STATE/pki/ca.pem)"
    pki init-ca --dir /pki --cn "Ember fleet CA ($TAG)"
  fi
  if [[ ! -f $STATE/fleet/api.pem ]]; then
    pki server-cert --dir /pki --name ember-fleet --name "ember-fleet.$NAMESPACE.svc" --name localhost
    mv "$STATE/pki/server.pem" "$STATE/fleet/api.pem" && mv "$STATE/pki/server.key" "$STATE/fleet/api.key"
  fi
  if [[ ! -f $STATE/fleet/fleet.pem ]]; then
    pki client-cert --dir /pki
    mv "$STATE/pki/fleet.pem" "$STATE/pki/fleet.key" "$STATE/fleet/"
  fi
  if [[ $# -gt 0 && ! -f $STATE/broker/server.pem ]]; then
    local args=() n
    for n in "$@"; do args+=(--name "$n"); done
    pki server-cert --dir /pki --name mosquitto --name "mosquitto.$NAMESPACE.svc" "${args[@]}"
    mv "$STATE/pki/server.pem" "$STATE/pki/server.key" "$STATE/broker/"
  fi
  cp "$STATE/pki/ca.pem" "$STATE/fleet/ca.pem"
  cp "$STATE/pki/ca.pem" "$STATE/broker/ca.pem"
  chmod 0600 "$STATE"/fleet/*.key "$STATE"/pki/*.key 2>/dev/null || true
  secret_file "$STATE/admin-token" openssl rand -hex 32
}

# kubectl apply of a Secret built from files or literals (create or update, never printed).
apply_secret() { # NAME ARGS...
  local name=$1; shift
  kubectl -n "$NAMESPACE" create secret generic "$name" "$@" --dry-run=client -o yaml | kubectl apply -f - >/dev/null
}

push_image() { # LOCAL-IMAGE REGISTRY/NAME -> prints the pushed reference with digest
  local src=$1 dst=$2
  need_image "$src"
  docker tag "$src" "$dst:$VERSION"
  docker push "$dst:$VERSION" >/dev/null || die "docker push $dst:$VERSION failed"
  docker inspect --format '{{range .RepoDigests}}{{println .}}{{end}}' "$dst:$VERSION" | grep -m1 "^$dst@"
}

# The kustomization applied: Terraform's generated one plus the pushed images pinned by digest.
apply_k8s() { # IMAGE-NAME=DIGEST-REF...
  local dir="$ROOT/deploy/.state/$TAG/k8s-apply" i
  mkdir -p "$dir"
  {
    echo "# Written by deploy/cloud/$TAG.sh: ../k8s (written by terraform/$TAG) with the images pinned by digest."
    echo "apiVersion: kustomize.config.k8s.io/v1beta1"
    echo "kind: Kustomization"
    echo "resources:"
    echo "  - ../k8s"
    echo "images:"
    for i in "$@"; do
      echo "  - name: ${i%%=*}"
      echo "    newName: ${i#*=}" | sed 's/@sha256:.*//'
      echo "    digest: ${i##*@}"
    done
  } >"$dir/kustomization.yaml"
  kubectl apply -k "$dir" >/dev/null || die "kubectl apply -k $dir failed"
  [[ ${NO_WAIT:-} == 1 ]] && return
  say "waiting for the fleet (up to ${WAIT_S}s)"
  kubectl -n "$NAMESPACE" rollout status statefulset/ember-fleet --timeout="${WAIT_S}s" >&2 ||
    die "the fleet did not become ready: kubectl -n $NAMESPACE describe pod -l app.kubernetes.io/component=fleet"
}

print_dashboard() {
  cat >&2 <<MSG
$TAG: up. The fleet's API and dashboard are not exposed to the internet (ClusterIP service):
    kubectl -n $NAMESPACE port-forward svc/ember-fleet 8443:443
  then open https://localhost:8443/dashboard/ (CA: $STATE/pki/ca.pem, admin token: $STATE/admin-token).
  Agent profile: $1
MSG
  echo "https://localhost:8443/dashboard/"
}

# Removes what up created on this machine (after a successful destroy).
remove_local_state() {
  rm -rf "$TF_DIR/.terraform" "$TF_DIR/terraform.tfstate" "$TF_DIR/terraform.tfstate.backup" \
    "$TF_DIR/.terraform.tfstate.lock.info" "$ROOT/deploy/.state/$TAG"
  [[ $STATE == "$ROOT/deploy/.state/$TAG" ]] || rm -rf "$STATE"
  say "removed the local state (Terraform state, PKI, tokens, generated files)"
}
