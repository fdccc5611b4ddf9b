#!/usr/bin/env bash
# Ember on Azure, one command each way (scripts/up.sh azure, scripts/down.sh azure):
#
#   deploy/cloud/azure.sh check   the prerequisites only (tools, az login, subscription,
#                                 resource providers, the azure-iot extension)
#   deploy/cloud/azure.sh up      check, terraform apply (terraform/azure), DPS linked to the hub,
#                                 the fleet CA's X.509 enrollment group, the ServiceConnect policy
#                                 for the built-in endpoint, images pushed to ACR, kubectl apply
#   deploy/cloud/azure.sh down    terraform destroy, removes the local state
#
# Settings (environment): EMBER_AZURE_SUBSCRIPTION (default: az's current subscription),
# EMBER_AZURE_LOCATION (default westeurope), EMBER_AZURE_ADMIN_CIDRS (who may reach the AKS API
# server, comma-separated; default: this machine's public address /32), EMBER_TF_VARS (extra
# arguments for terraform apply), EMBER_STATE_DIR (default deploy/.state/azure).
# Idempotent: running up again changes only what drifted; down on nothing is a no-op.
set -euo pipefail
TAG=azure
source "$(dirname "$0")/lib.sh"
TF_DIR="$ROOT/terraform/azure"
STATE=${EMBER_STATE_DIR:-$ROOT/deploy/.state/azure}
LOCATION=${EMBER_AZURE_LOCATION:-westeurope}
PROVIDERS=(Microsoft.Devices Microsoft.ContainerService Microsoft.ContainerRegistry Microsoft.DBforPostgreSQL
  Microsoft.Storage Microsoft.Network Microsoft.ManagedIdentity Microsoft.OperationalInsights Microsoft.Insights)

check() {
  need az "install the Azure CLI (https://learn.microsoft.com/cli/azure/install-azure-cli)"
  az account show >/dev/null 2>&1 || die "the Azure CLI is not logged in (az account show failed): run az login"
  if [[ -n ${EMBER_AZURE_SUBSCRIPTION:-} ]]; then
    az account set --subscription "$EMBER_AZURE_SUBSCRIPTION" >/dev/null 2>&1 ||
      die "subscription $EMBER_AZURE_SUBSCRIPTION is not available to your login: az account list -o table shows those that are"
  fi
  SUBSCRIPTION=$(az account show --query id -o tsv 2>/dev/null)
  [[ $SUBSCRIPTION =~ ^[0-9a-fA-F-]{36}$ ]] ||
    die "no subscription selected: az account set --subscription ID, or set EMBER_AZURE_SUBSCRIPTION"
  need_common_tools
  need kubelogin "install kubelogin (az aks install-cli): AKS here authenticates with Entra ID only"
  az extension show --name azure-iot >/dev/null 2>&1 || {
    say "adding the azure-iot CLI extension (DPS enrollment groups, hub policies)"
    az extension add --name azure-iot --only-show-errors >&2 || die "az extension add --name azure-iot failed"
  }
  local p state
  for p in "${PROVIDERS[@]}"; do
    state=$(az provider show --namespace "$p" --query registrationState -o tsv 2>/dev/null || true)
    if [[ $state != Registered ]]; then
      say "registering resource provider $p on subscription $SUBSCRIPTION"
      az provider register --namespace "$p" --wait >&2 ||
        die "could not register $p: a subscription owner or contributor must run az provider register --namespace $p"
    fi
  done
  # AKS nodes encrypt their host disks (host_encryption_enabled): a subscription feature.
  state=$(az feature show --namespace Microsoft.Compute --name EncryptionAtHost --query properties.state -o tsv 2>/dev/null || true)
  [[ $state == Registered ]] ||
    die "the subscription feature Microsoft.Compute/EncryptionAtHost is '$state': run az feature register --namespace Microsoft.Compute --name EncryptionAtHost, wait until it is Registered, then az provider register --namespace Microsoft.Compute"
  say "prerequisites ok (subscription $SUBSCRIPTION, location $LOCATION)"
}

tf_vars() {
  TFVARS=(-var "subscription_id=$SUBSCRIPTION" -var "location=$LOCATION" -var "state_dir=$STATE")
  TFVARS+=(-var "api_authorized_cidrs=$(hcl_list "$(operator_cidrs "${EMBER_AZURE_ADMIN_CIDRS:-}" EMBER_AZURE_ADMIN_CIDRS)")")
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
  say "terraform apply (IoT Hub, DPS, AKS, PostgreSQL, storage: 15-25 minutes the first time)"
  tf apply -input=false -auto-approve "${TFVARS[@]}" >&2 || die "terraform apply failed (its messages are above)"

  local rg hub dps aks registry
  rg=$(out resource_group) hub=$(out iothub_name) dps=$(out dps_name) aks=$(out aks_name) registry=$(out registry)
  make_pki

  # DPS -> hub link (the CLI fetches the hub's connection string itself; not in Terraform's state).
  if [[ -z $(az iot dps linked-hub list --dps-name "$dps" -g "$rg" --query '[].name' -o tsv) ]]; then
    say "linking DPS $dps to $hub"
    az iot dps linked-hub create --dps-name "$dps" -g "$rg" --hub-name "$hub" --only-show-errors >/dev/null
  fi
  # The fleet CA as a verified DPS certificate, and the X.509 enrollment group that trusts it:
  # a device with a certificate from this CA (common name = device id) registers itself.
  if ! az iot dps certificate show --dps-name "$dps" -g "$rg" --certificate-name ember-fleet-ca >/dev/null 2>&1; then
    az iot dps certificate create --dps-name "$dps" -g "$rg" --certificate-name ember-fleet-ca \
      --path "$STATE/pki/ca.pem" --verified true --only-show-errors >/dev/null
  fi
  if ! az iot dps enrollment-group show --dps-name "$dps" -g "$rg" --enrollment-id ember-fleet >/dev/null 2>&1; then
    say "creating the DPS enrollment group ember-fleet (X.509, CA ember-fleet-ca)"
    az iot dps enrollment-group create --dps-name "$dps" -g "$rg" --enrollment-id ember-fleet \
      --ca-name ember-fleet-ca --iot-hubs "$hub.azure-devices.net" --only-show-errors >/dev/null
  fi
  # The fleet's read access to the built-in endpoint: ServiceConnect only.
  az iot hub policy show --hub-name "$hub" -g "$rg" --name ember-fleet-service >/dev/null 2>&1 ||
    az iot hub policy create --hub-name "$hub" -g "$rg" --name ember-fleet-service --permissions ServiceConnect --only-show-errors >/dev/null

  say "pushing images to $registry"
  az acr login --name "${registry%%.*}" --only-show-errors >/dev/null
  local fleet_ref
  fleet_ref=$(push_image "ember-fleet:$VERSION" "$registry/ember-fleet")

  az aks get-credentials -g "$rg" -n "$aks" --overwrite-existing --only-show-errors >/dev/null ||
    die "az aks get-credentials failed: is your address in EMBER_AZURE_ADMIN_CIDRS?"
  kubelogin convert-kubeconfig -l azurecli >/dev/null
  kubectl create namespace "$NAMESPACE" --dry-run=client -o yaml | kubectl apply -f - >/dev/null
  apply_secret ember-fleet-secrets \
    --from-literal=database-url="postgres://$(tf output -json fleet_identity | sed -nE 's/.*"name":"([^"]+)".*/\1/p')@$(out postgres_fqdn):5432/ember?sslmode=require" \
    --from-file=bootstrap-token="$STATE/admin-token"
  apply_secret ember-fleet-tls --from-file="$STATE/fleet/ca.pem" --from-file="$STATE/fleet/api.pem" \
    --from-file="$STATE/fleet/api.key" --from-file="$STATE/fleet/fleet.pem" --from-file="$STATE/fleet/fleet.key"
  apply_secret ember-iothub --from-file=eventhub-connection-string=<(az iot hub connection-string show --hub-name "$hub" -g "$rg" \
    --policy-name ember-fleet-service --eh --query connectionString -o tsv) \
    --from-file=service-connection-string=<(az iot hub connection-string show --hub-name "$hub" -g "$rg" \
    --policy-name ember-fleet-service --query connectionString -o tsv)
  # The fleet on AKS becomes ready once it can sign in to PostgreSQL with its Entra ID token
  # (issue 19, in progress): do not wait.
  NO_WAIT=1 apply_k8s "ember-fleet=$fleet_ref"
  say "IoT Hub: $(out iothub_hostname); DPS ID scope: $(out dps_id_scope)"
  say "the fleet's Entra ID sign-in to PostgreSQL is in progress (issue 19): until it lands the fleet pods run but are not ready"
  print_dashboard "$(out agent_profile_file)"
}

down() {
  if [[ ! -f $TF_DIR/terraform.tfstate ]] || ! grep -q '"type": "azurerm_' "$TF_DIR/terraform.tfstate"; then
    say "nothing to destroy (no Terraform state with Azure resources in $TF_DIR)"
    remove_local_state
    return
  fi
  check
  tf_init
  tf_vars
  # Blob containers are deleted with the storage account (no emptying needed: Terraform manages
  # them through Azure Resource Manager); the DPS link, certificate and enrollment group go
  # with the DPS, the hub policy with the hub.
  say "terraform destroy"
  tf destroy -input=false -auto-approve "${TFVARS[@]}" >&2 ||
    die "terraform destroy failed: run scripts/down.sh azure again (it resumes); the state is kept"
  remove_local_state
}

case ${1:-} in
  check) check ;;
  up) up ;;
  down) down ;;
  *) die "usage: deploy/cloud/azure.sh check|up|down" ;;
esac
