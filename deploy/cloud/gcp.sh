#!/usr/bin/env bash
# Ember on Google Cloud, one command each way (scripts/up.sh gcp, scripts/down.sh gcp):
#
#   deploy/cloud/gcp.sh check   the prerequisites only (tools, gcloud login, project, APIs)
#   deploy/cloud/gcp.sh up      check, terraform apply (terraform/gcp), PKI and secrets, images
#                               pushed to Artifact Registry, kubectl apply; prints the dashboard
#   deploy/cloud/gcp.sh down    empties the buckets, terraform destroy, removes the local state
#
# Settings (environment): EMBER_GCP_PROJECT (default: gcloud's configured project),
# EMBER_GCP_REGION (default europe-west1), EMBER_GCP_ADMIN_CIDRS (who may reach the GKE control
# plane, comma-separated; default: this machine's public address /32), EMBER_GCP_BROKER_DNS
# (optional DNS name for the broker), EMBER_TF_VARS (extra arguments for terraform apply, e.g.
# "-var db_high_availability=false"), EMBER_STATE_DIR (default deploy/.state/gcp).
# Idempotent: running up again changes only what drifted; down on nothing is a no-op.
set -euo pipefail
TAG=gcp
source "$(dirname "$0")/lib.sh"
TF_DIR="$ROOT/terraform/gcp"
STATE=${EMBER_STATE_DIR:-$ROOT/deploy/.state/gcp}
REGION=${EMBER_GCP_REGION:-europe-west1}
APIS=(artifactregistry bigquery binaryauthorization compute container iam pubsub servicenetworking sqladmin storage cloudresourcemanager)

check() {
  need gcloud "install the Google Cloud CLI (https://cloud.google.com/sdk/docs/install)"
  gcloud auth print-access-token >/dev/null 2>&1 ||
    die "gcloud is not logged in (gcloud auth print-access-token failed): run gcloud auth login"
  gcloud auth application-default print-access-token >/dev/null 2>&1 ||
    die "Terraform's Google credentials are missing (application default credentials): run gcloud auth application-default login"
  PROJECT=${EMBER_GCP_PROJECT:-$(gcloud config get-value project 2>/dev/null || true)}
  [[ -n $PROJECT && $PROJECT != "(unset)" ]] ||
    die "no Google Cloud project: run gcloud config set project PROJECT_ID, or set EMBER_GCP_PROJECT"
  gcloud projects describe "$PROJECT" --format='value(projectId)' >/dev/null 2>&1 ||
    die "project $PROJECT cannot be read with your account: check the ID (gcloud projects list) and your roles on it"
  need_common_tools
  local enabled missing=() a
  enabled=$(gcloud services list --enabled --project "$PROJECT" --format='value(config.name)' 2>/dev/null) ||
    die "cannot list the enabled APIs of $PROJECT (needs serviceusage.services.list)"
  for a in "${APIS[@]}"; do grep -qx "$a.googleapis.com" <<<"$enabled" || missing+=("$a.googleapis.com"); done
  if [[ ${#missing[@]} -gt 0 ]]; then
    say "enabling APIs on $PROJECT: ${missing[*]}"
    gcloud services enable "${missing[@]}" --project "$PROJECT" >&2 ||
      die "could not enable ${missing[*]} on $PROJECT: enable them in the console or ask a project owner (roles/serviceusage.serviceUsageAdmin)"
  fi
  say "prerequisites ok (project $PROJECT, region $REGION)"
}

tf_vars() {
  TFVARS=(-var "project_id=$PROJECT" -var "region=$REGION" -var "state_dir=$STATE")
  [[ -n ${EMBER_GCP_BROKER_DNS:-} ]] && TFVARS+=(-var "broker_dns_name=$EMBER_GCP_BROKER_DNS")
  TFVARS+=(-var "master_authorized_cidrs=$(hcl_list "$(operator_cidrs "${EMBER_GCP_ADMIN_CIDRS:-}" EMBER_GCP_ADMIN_CIDRS)")")
  # shellcheck disable=SC2206 # extra arguments, split on purpose
  [[ -n ${EMBER_TF_VARS:-} ]] && TFVARS+=(${EMBER_TF_VARS})
  return 0
}

out() { tf output -raw "$1"; }

up() {
  check
  if [[ ${EMBER_CLOUD_PREFLIGHT_ONLY:-} == 1 ]]; then say "EMBER_CLOUD_PREFLIGHT_ONLY=1: stopping before terraform"; return; fi
  mkdir -p "$STATE" && chmod 0700 "$STATE"
  tf_init
  tf_vars
  say "terraform apply (GKE, Cloud SQL, Pub/Sub, BigQuery, buckets: 15-25 minutes the first time)"
  tf apply -input=false -auto-approve "${TFVARS[@]}" >&2 || die "terraform apply failed (its messages are above)"

  local broker_ip registry instance cluster
  broker_ip=$(out broker_ip) registry=$(out image_registry) instance=$(out cloudsql_instance_name) cluster=$(out cluster_name)
  local names=("$broker_ip")
  [[ -n ${EMBER_GCP_BROKER_DNS:-} ]] && names+=("$EMBER_GCP_BROKER_DNS")
  make_pki "${names[@]}"

  # The database user's password: generated here, set with gcloud, never in Terraform's state
  # (gcloud takes it as an argument: it is visible to this machine's process list for the
  # second the call lasts).
  secret_file "$STATE/db-password" openssl rand -hex 24
  if gcloud sql users list --instance "$instance" --project "$PROJECT" --format='value(name)' | grep -qx ember; then
    gcloud sql users set-password ember --instance "$instance" --project "$PROJECT" --password "$(cat "$STATE/db-password")" >/dev/null
  else
    gcloud sql users create ember --instance "$instance" --project "$PROJECT" --password "$(cat "$STATE/db-password")" >/dev/null
  fi

  say "pushing images to $registry"
  gcloud auth configure-docker "$REGION-docker.pkg.dev" --quiet >/dev/null 2>&1
  local fleet_ref broker_ref
  fleet_ref=$(push_image "ember-fleet:$VERSION" "$registry/ember-fleet")
  broker_ref=$(push_image "ember-mosquitto:$VERSION" "$registry/ember-mosquitto")

  need gke-gcloud-auth-plugin "gcloud components install gke-gcloud-auth-plugin (kubectl's GKE login)"
  gcloud container clusters get-credentials "$cluster" --region "$REGION" --project "$PROJECT" >/dev/null 2>&1 ||
    die "gcloud container clusters get-credentials $cluster failed: is your address in EMBER_GCP_ADMIN_CIDRS?"
  kubectl create namespace "$NAMESPACE" --dry-run=client -o yaml | kubectl apply -f - >/dev/null
  apply_secret ember-fleet-secrets \
    --from-file=database-url=<(printf 'postgres://ember:%s@127.0.0.1:5432/ember' "$(cat "$STATE/db-password")") \
    --from-file=bootstrap-token="$STATE/admin-token"
  apply_secret ember-fleet-tls --from-file="$STATE/fleet/ca.pem" --from-file="$STATE/fleet/api.pem" \
    --from-file="$STATE/fleet/api.key" --from-file="$STATE/fleet/fleet.pem" --from-file="$STATE/fleet/fleet.key"
  apply_secret ember-broker-tls --from-file="$STATE/broker/ca.pem" --from-file="$STATE/broker/server.pem" \
    --from-file="$STATE/broker/server.key"
  apply_k8s "ember-fleet=$fleet_ref" "ember-mosquitto=$broker_ref"
  say "broker: $(out broker_endpoint) (devices: certificates from ember-fleet pki device-cert --dir $STATE/pki)"
  print_dashboard "$(out agent_profile_file)"
}

down() {
  if [[ ! -f $TF_DIR/terraform.tfstate ]] || ! grep -q '"type": "google_' "$TF_DIR/terraform.tfstate"; then
    say "nothing to destroy (no Terraform state with Google resources in $TF_DIR)"
    remove_local_state
    return
  fi
  check
  tf_init
  tf_vars
  # Terraform refuses to delete non-empty buckets (force_destroy = false, on purpose): empty
  # them, every object version included.
  local b
  for b in $(tf output -json buckets 2>/dev/null | tr -d '{}" ' | tr ',' '\n' | cut -d: -f2); do
    say "emptying gs://$b (all versions)"
    gcloud storage rm --recursive --all-versions "gs://$b/**" --project "$PROJECT" >/dev/null 2>&1 || true
  done
  # Deletion protection (database, cluster, BigQuery tables) off, then destroy.
  say "turning deletion protection off, then terraform destroy"
  tf apply -input=false -auto-approve "${TFVARS[@]}" -var deletion_protection=false >&2 ||
    die "terraform apply (deletion_protection=false) failed"
  tf destroy -input=false -auto-approve "${TFVARS[@]}" -var deletion_protection=false >&2 ||
    die "terraform destroy failed: run scripts/down.sh gcp again (it resumes); the state is kept"
  remove_local_state
}

case ${1:-} in
  check) check ;;
  up) up ;;
  down) down ;;
  *) die "usage: deploy/cloud/gcp.sh check|up|down" ;;
esac
