#!/usr/bin/env bash
# scripts/up.sh and down.sh for gcp and azure, without a cloud account (a step of validate.sh):
# their prerequisite checks against fake gcloud/az/terraform/kubectl/docker programs on a PATH
# that has nothing else of the machine's cloud tools. Each case runs a copy of the scripts in a
# temporary repository root, so nothing of a real deployment's state is touched. Asserts the exit
# status and the message a user sees (e.g. "run gcloud auth login" when gcloud is not logged in).
# Ends with a cargo-style "test result:" line.
set -uo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
WORK=$(mktemp -d /tmp/ember-cloud-scripts.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
passed=0 failed=0 failures=()

# The copy of the repository the scripts run in.
REPO=$WORK/repo
mkdir -p "$REPO/scripts" "$REPO/deploy" "$REPO/terraform/gcp" "$REPO/terraform/azure"
cp "$ROOT/scripts/up.sh" "$ROOT/scripts/down.sh" "$REPO/scripts/"
cp -r "$ROOT/deploy/cloud" "$REPO/deploy/"
cp "$ROOT/Cargo.toml" "$REPO/"

# A PATH with the basic tools only (symlinks), plus the fakes a case asks for.
BASE=$WORK/base
mkdir -p "$BASE"
for t in bash sh env sed grep head tail cat tr cut dirname basename mkdir chmod rm cp mv id date sort printf; do
  p=$(command -v "$t") && ln -sf "$p" "$BASE/$t"
done

# fake NAME SCRIPT-BODY: a program in the case's bin directory.
fake() {
  printf '#!/bin/bash\n%s\n' "$2" >"$BIN/$1"
  chmod +x "$BIN/$1"
}

# The fakes' behaviour is set per case through FAKE_* variables.
fake_gcloud='echo "gcloud $*" >>"$FAKE_LOG"
case "$*" in
  "auth print-access-token") [[ ${FAKE_AUTH:-ok} == ok ]] && echo token || { echo "ERROR: (gcloud.auth.print-access-token) You do not currently have an active account selected." >&2; exit 1; } ;;
  "auth application-default print-access-token") [[ ${FAKE_ADC:-ok} == ok ]] && echo token || exit 1 ;;
  "config get-value project") echo "${FAKE_PROJECT-ember-test-1}" ;;
  "projects describe"*) exit 0 ;;
  "services list"*) printf "%s\n" ${FAKE_ENABLED-artifactregistry.googleapis.com bigquery.googleapis.com binaryauthorization.googleapis.com compute.googleapis.com container.googleapis.com iam.googleapis.com pubsub.googleapis.com servicenetworking.googleapis.com sqladmin.googleapis.com storage.googleapis.com cloudresourcemanager.googleapis.com} ;;
  "services enable"*) exit 0 ;;
  *) echo "fake gcloud: unexpected: $*" >&2; exit 3 ;;
esac'
fake_az='echo "az $*" >>"$FAKE_LOG"
case "$*" in
  "account show") [[ ${FAKE_LOGIN:-ok} == ok ]] || { echo "Please run \"az login\" to setup account." >&2; exit 1; }; echo "{}" ;;
  "account show --query id -o tsv") echo 0b7e6c2a-1111-2222-3333-444455556666 ;;
  "account set"*) [[ ${FAKE_SUB:-ok} == ok ]] || { echo "The subscription of ... does not exist" >&2; exit 1; } ;;
  "extension show"*) exit 0 ;;
  "provider show"*) [[ ${FAKE_UNREGISTERED:-} == "$4" ]] && echo NotRegistered || echo Registered ;;
  "provider register"*) exit 0 ;;
  "feature show"*) echo "${FAKE_FEATURE:-Registered}" ;;
  *) echo "fake az: unexpected: $*" >&2; exit 3 ;;
esac'
ok_tool='exit 0'
# terraform that records its arguments and fails at apply (the case stops there).
fake_terraform='echo "terraform $*" >>"$FAKE_LOG"; case "$*" in *" apply "*) echo "Error: fake apply" >&2; exit 1 ;; esac; exit 0'

# case NAME EXPECTED-RC EXPECTED-MESSAGE FAKES -- COMMAND...: runs the command on the fake PATH.
case_() {
  local name=$1 want_rc=$2 want_msg=$3; shift 3
  BIN=$WORK/$name/bin
  mkdir -p "$BIN"
  export FAKE_LOG=$WORK/$name/calls.log
  : >"$FAKE_LOG"
  while [[ $1 != -- ]]; do
    case $1 in
      gcloud) fake gcloud "$fake_gcloud" ;;
      az) fake az "$fake_az" ;;
      terraform-recording) fake terraform "$fake_terraform" ;;
      *) fake "$1" "$ok_tool" ;;
    esac
    shift
  done
  shift
  local out rc
  out=$(cd "$REPO" && PATH="$BIN:$BASE" EMBER_CLOUD_PREFLIGHT_ONLY=${PREFLIGHT:-1} "$@" 2>&1)
  rc=$?
  if [[ $rc == "$want_rc" && $out == *"$want_msg"* ]]; then
    passed=$((passed + 1)); echo "test cloud_scripts::$name ... ok"
  else
    failed=$((failed + 1)); failures+=("$name")
    echo "test cloud_scripts::$name ... FAILED"
    echo "    wanted exit $want_rc and a message with: $want_msg"
    echo "    got exit $rc and:"; sed 's/^/      /' <<<"$out"
  fi
}
# must_have_called NAME PATTERN: the fakes' call log of case NAME has a line matching PATTERN.
must_have_called() {
  if grep -qE "$2" "$WORK/$1/calls.log"; then
    passed=$((passed + 1)); echo "test cloud_scripts::$1_called ... ok"
  else
    failed=$((failed + 1)); failures+=("$1_called"); echo "test cloud_scripts::$1_called ... FAILED (no call matching $2)"
    sed 's/^/      /' "$WORK/$1/calls.log"
  fi
}

TOOLS=(terraform kubectl docker openssl)
# --- gcp
case_ gcp_no_gcloud 1 "gcloud is not installed: install the Google Cloud CLI" "${TOOLS[@]}" -- bash scripts/up.sh gcp
FAKE_AUTH=fail case_ gcp_not_logged_in 1 "run gcloud auth login" gcloud "${TOOLS[@]}" -- bash scripts/up.sh gcp
FAKE_ADC=fail case_ gcp_no_adc 1 "run gcloud auth application-default login" gcloud "${TOOLS[@]}" -- bash scripts/up.sh gcp
FAKE_PROJECT="" case_ gcp_no_project 1 "no Google Cloud project: run gcloud config set project PROJECT_ID" gcloud "${TOOLS[@]}" -- bash scripts/up.sh gcp
FAKE_PROJECT="(unset)" case_ gcp_project_unset 1 "no Google Cloud project" gcloud "${TOOLS[@]}" -- bash scripts/up.sh gcp
case_ gcp_no_terraform 1 "terraform is not installed" gcloud kubectl docker openssl -- bash scripts/up.sh gcp
FAKE_ENABLED="compute.googleapis.com iam.googleapis.com" case_ gcp_enables_apis 0 "enabling APIs on ember-test-1" gcloud "${TOOLS[@]}" -- bash scripts/up.sh gcp
must_have_called gcp_enables_apis '^gcloud services enable .*container\.googleapis\.com.*pubsub\.googleapis\.com.*sqladmin\.googleapis\.com.*--project ember-test-1'
case_ gcp_prerequisites_ok 0 "prerequisites ok (project ember-test-1" gcloud "${TOOLS[@]}" -- bash scripts/up.sh gcp
EMBER_GCP_PROJECT=other-project-2 case_ gcp_project_from_env 0 "prerequisites ok (project other-project-2" gcloud "${TOOLS[@]}" -- bash scripts/up.sh gcp
# Past the checks: the variables terraform apply gets (the fake fails at apply, so nothing follows).
PREFLIGHT=0 EMBER_GCP_ADMIN_CIDRS=203.0.113.7/32,198.51.100.0/24 EMBER_GCP_REGION=us-central1 \
  case_ gcp_apply_vars 1 "terraform apply failed" gcloud terraform-recording kubectl docker openssl -- bash scripts/up.sh gcp
must_have_called gcp_apply_vars '^terraform -chdir=.*/terraform/gcp apply -input=false -auto-approve -var project_id=ember-test-1 -var region=us-central1 -var state_dir=.*/deploy/\.state/gcp -var master_authorized_cidrs=\["203\.0\.113\.7/32","198\.51\.100\.0/24"\]$'
case_ gcp_down_nothing 0 "nothing to destroy" "${TOOLS[@]}" -- bash scripts/down.sh gcp
# --- azure
case_ azure_no_az 1 "az is not installed: install the Azure CLI" "${TOOLS[@]}" kubelogin -- bash scripts/up.sh azure
FAKE_LOGIN=fail case_ azure_not_logged_in 1 "az account show failed): run az login" az "${TOOLS[@]}" kubelogin -- bash scripts/up.sh azure
FAKE_SUB=fail EMBER_AZURE_SUBSCRIPTION=0000 case_ azure_bad_subscription 1 "subscription 0000 is not available to your login" az "${TOOLS[@]}" kubelogin -- bash scripts/up.sh azure
case_ azure_no_kubelogin 1 "kubelogin is not installed" az "${TOOLS[@]}" -- bash scripts/up.sh azure
FAKE_FEATURE=NotRegistered case_ azure_host_encryption_feature 1 "Microsoft.Compute/EncryptionAtHost is 'NotRegistered'" az "${TOOLS[@]}" kubelogin -- bash scripts/up.sh azure
FAKE_UNREGISTERED=Microsoft.Devices case_ azure_registers_provider 0 "registering resource provider Microsoft.Devices" az "${TOOLS[@]}" kubelogin -- bash scripts/up.sh azure
must_have_called azure_registers_provider '^az provider register --namespace Microsoft.Devices --wait'
case_ azure_prerequisites_ok 0 "prerequisites ok (subscription 0b7e6c2a-1111-2222-3333-444455556666" az "${TOOLS[@]}" kubelogin -- bash scripts/up.sh azure
PREFLIGHT=0 EMBER_AZURE_ADMIN_CIDRS=203.0.113.7/32 \
  case_ azure_apply_vars 1 "terraform apply failed" az terraform-recording kubectl docker openssl kubelogin -- bash scripts/up.sh azure
must_have_called azure_apply_vars '^terraform -chdir=.*/terraform/azure apply -input=false -auto-approve -var subscription_id=0b7e6c2a-1111-2222-3333-444455556666 -var location=westeurope -var state_dir=.*/deploy/\.state/azure -var api_authorized_cidrs=\["203\.0\.113\.7/32"\]$'
case_ azure_down_nothing 0 "nothing to destroy" "${TOOLS[@]}" -- bash scripts/down.sh azure
# --- both
case_ usage 2 "usage: scripts/up.sh local|aws|gcp|azure" -- bash scripts/up.sh mars

[[ $failed -eq 0 ]] || echo "failures: ${failures[*]}"
if [[ $failed -eq 0 ]]; then
  echo "test result: ok. $passed passed; 0 failed; 0 ignored"
else
  echo "test result: FAILED. $passed passed; $failed failed; 0 ignored"
  exit 1
fi
