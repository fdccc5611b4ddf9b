#!/usr/bin/env bash
# Ember on AWS in idempotent steps (scripts/up.sh aws and scripts/down.sh aws call them):
#   check   prerequisites: tools, AWS credentials, the region (clear errors, nothing changed)
#   up      device keys + CSRs (keys stay in the state dir, mode 0600), terraform apply,
#           per-device agent configs from the agent profile, the fleet on EKS (overlay aws)
#   down    empty the two versioned buckets, lift RDS deletion protection, terraform destroy,
#           remove the local state files this script created
#
# Settings (environment):
#   EMBER_AWS_REGION    the region (default eu-west-1); must match the AWS CLI's region
#   EMBER_AWS_NAME      resource prefix (default ember)
#   EMBER_AWS_DEVICES   how many devices to provision (default 3: ember-dev-1..3)
#   EMBER_STATE_DIR     local state (default deploy/.state/aws; git-ignored)
#   EMBER_AGENT_BIN, EMBER_FLEET_BIN   the host binaries for keygen/csr and pki (default: on
#                       PATH, else target/release/)
# Nothing here was run against a real AWS account (docs/deploy-aws.md, "Not tested").
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
REGION=${EMBER_AWS_REGION:-eu-west-1}
NAME=${EMBER_AWS_NAME:-ember}
DEVICES=${EMBER_AWS_DEVICES:-3}
STATE=${EMBER_STATE_DIR:-$root/deploy/.state/aws}
TF="terraform -chdir=$root/terraform/aws"
export TF_DATA_DIR="$STATE/terraform"

die() { echo "aws: $*" >&2; exit 1; }
bin() { # name: the host binary
  local var=$2
  if [[ -n ${!var:-} ]]; then echo "${!var}"; return; fi
  command -v "$1" 2>/dev/null || { [[ -x $root/target/release/$1 ]] && echo "$root/target/release/$1"; } || die "$1 is missing: cargo build --release -p $3, or set $var"
}

check() {
  for t in aws terraform kubectl curl jq; do
    command -v "$t" >/dev/null || die "$t is missing (install it; docs/deploy-aws.md, Prerequisites)"
  done
  [[ $DEVICES =~ ^[0-9]+$ ]] || die "EMBER_AWS_DEVICES must be a number"
  # The region first: it needs no network.
  local cli_region=${AWS_REGION:-${AWS_DEFAULT_REGION:-$(aws configure get region 2>/dev/null || true)}}
  [[ -n $cli_region ]] || die "the AWS CLI has no region: export AWS_REGION=$REGION"
  [[ $cli_region == "$REGION" ]] || die "wrong region: the AWS CLI uses $cli_region, this deployment $REGION (EMBER_AWS_REGION). Make them the same."
  local err; err=$(mktemp)
  if ! aws sts get-caller-identity --output json >/dev/null 2>"$err"; then
    local why; why=$(tr '\n' ' ' <"$err"); rm -f "$err"
    die "no usable AWS credentials ($why). Run 'aws configure' or 'aws sso login', or export AWS_PROFILE."
  fi
  rm -f "$err"
  aws iot describe-endpoint --endpoint-type iot:Data-ATS --region "$REGION" >/dev/null 2>&1 \
    || die "AWS IoT Core does not answer in $REGION (not offered there, or the credentials lack iot:DescribeEndpoint)"
}

csrs() { # keys and CSRs per device; the Terraform variables file
  local agent; agent=$(bin ember-agent EMBER_AGENT_BIN ember-agent)
  mkdir -p "$STATE/devices" && chmod 0700 "$STATE"
  local json="{}"
  for i in $(seq 1 "$DEVICES"); do
    local id="$NAME-dev-$i" d="$STATE/devices/$NAME-dev-$i"
    mkdir -p "$d"
    [[ -f $d/device.key ]] || "$agent" keygen --out "$d/device.key"
    "$agent" csr --device-id "$id" --key "$d/device.key" >"$d/device.csr"
    json=$(jq --arg id "$id" --rawfile csr "$d/device.csr" '. + {($id): $csr}' <<<"$json")
  done
  jq -n --arg region "$REGION" --arg name "$NAME" --argjson devices "$json" \
    '{region: $region, name: $name, devices: $devices}' >"$STATE/terraform.tfvars.json"
}

agents() { # per-device agent configs from the agent profile and the issued certificates
  $TF output -json agent_profile >"$STATE/agent-profile.json"
  $TF output -json device_certificates >"$STATE/device-certificates.json"
  [[ -f $STATE/AmazonRootCA1.pem ]] || curl -fsS -o "$STATE/AmazonRootCA1.pem" "$(jq -r .ca_url "$STATE/agent-profile.json")"
  for id in $(jq -r 'keys[]' "$STATE/device-certificates.json"); do
    local d="$STATE/devices/$id"
    jq -r --arg id "$id" '.[$id]' "$STATE/device-certificates.json" >"$d/device.pem"
    cp "$STATE/AmazonRootCA1.pem" "$d/ca.pem"
    cp "$STATE/agent-profile.json" "$d/agent-profile.json"
    cat >"$d/agent.toml" <<EOF
# AWS IoT Core (terraform/aws, thing $id). Copy this directory to the device as /etc/ember/.
device_id = "$id"

[mqtt]
# IoT Core's rules, checked by \`ember-agent check\`: client id = thing name, mutual TLS,
# keep-alive 30-1200 s, 128 KiB payloads, publishes paced under 100/s per connection.
profile = "aws-iot-core"
# The endpoint, port and limits terraform/aws wrote (host/port here would override them).
profile_file = "/etc/ember/agent-profile.json"
# The fleet reads Kinesis, which has no way back to the device for commit watermarks: a
# record leaves the queue on IoT Core's PUBACK (the topic rule then delivers it to Kinesis,
# failures land in the rule's error log).
delivery = "puback"

[mqtt.tls]
ca_file = "/etc/ember/ca.pem"
cert_file = "/etc/ember/device.pem"
key_file = "/etc/ember/device.key"
EOF
  done
}

fleet() { # the fleet on EKS through the aws overlay, with the real values
  local fleet_bin; fleet_bin=$(bin ember-fleet EMBER_FLEET_BIN ember-fleet)
  aws eks update-kubeconfig --region "$REGION" --name "$($TF output -raw eks_cluster)" >/dev/null
  local o="$STATE/overlay"
  rm -rf "$o" && mkdir -p "$o" && cp "$root"/deploy/k8s/overlays/aws/*.yaml "$o/"
  sed -i "s|../../base|$root/deploy/k8s/base|" "$o/kustomization.yaml"
  local account endpoint stream bundles
  endpoint=$(jq -r .endpoint "$STATE/agent-profile.json")
  stream=$($TF output -raw kinesis_stream)
  bundles=$($TF output -json buckets | jq -r .bundles)
  sed -i "s|arn:aws:iam::000000000000:role/ember-fleet|$($TF output -raw fleet_role_arn)|" "$o/serviceaccount-irsa.yaml"
  sed -i -e "s|ember-bundles-000000000000-eu-west-1|$bundles|" -e "s|\"ember-ingest\"|\"$stream\"|" \
    -e "s|eu-west-1|$REGION|g" -e "s|example-ats.iot.$REGION.amazonaws.com|$endpoint|" "$o/fleet-config.yaml"
  # The API's certificate from the fleet's own PKI; the database URL from the RDS-managed
  # secret. Both go straight into Kubernetes Secrets (never into git or Terraform state).
  mkdir -p "$STATE/pki" && chmod 0700 "$STATE/pki"
  [[ -f $STATE/pki/ca.pem ]] || "$fleet_bin" pki init-ca --dir "$STATE/pki" --cn "Ember on AWS" >/dev/null
  [[ -f $STATE/pki/server.pem ]] || "$fleet_bin" pki server-cert --dir "$STATE/pki" --name ember-fleet >/dev/null
  local secret user pass host
  secret=$(aws secretsmanager get-secret-value --region "$REGION" --secret-id "$($TF output -raw database_secret_arn)" --query SecretString --output text)
  user=$(jq -r .username <<<"$secret"); pass=$(jq -r '.password | @uri' <<<"$secret")
  host=$($TF output -raw database_endpoint)
  kubectl apply -f "$o/namespace.yaml" >/dev/null
  kubectl -n ember create secret generic ember-fleet-secrets --dry-run=client -o yaml \
    --from-literal=database-url="postgres://$user:$pass@$host/ember?sslmode=require" \
    --from-literal=bootstrap-token="$(head -c 24 /dev/urandom | base64 | tr -d '/+=')" | kubectl apply -f - >/dev/null
  kubectl -n ember create secret generic ember-fleet-tls --dry-run=client -o yaml \
    --from-file=ca.pem="$STATE/pki/ca.pem" --from-file=api.pem="$STATE/pki/server.pem" \
    --from-file=api.key="$STATE/pki/server.key" --from-file=fleet.pem="$STATE/pki/server.pem" \
    --from-file=fleet.key="$STATE/pki/server.key" | kubectl apply -f - >/dev/null
  kubectl apply -k "$o" >/dev/null
  kubectl -n ember rollout status statefulset/ember-fleet --timeout=600s >/dev/null
}

up() {
  check
  mkdir -p "$STATE"
  csrs
  $TF init -input=false >/dev/null
  $TF apply -input=false -auto-approve -var-file="$STATE/terraform.tfvars.json"
  agents
  fleet
  echo "aws: up. Dashboard: kubectl -n ember port-forward svc/ember-fleet 8443:8443, then https://localhost:8443/dashboard/"
  echo "aws: agent configs: $STATE/devices/<thing>/ (agent.toml, ca.pem, device.pem, device.key)"
}

down() {
  check
  if [[ ! -f $STATE/terraform.tfvars.json ]]; then echo "aws: nothing deployed from $STATE"; return; fi
  $TF init -input=false >/dev/null
  # Versioned buckets: every version and delete marker must go before Terraform may delete them.
  for b in $($TF output -json buckets 2>/dev/null | jq -r '.[]' 2>/dev/null); do
    while :; do
      local page; page=$(aws s3api list-object-versions --bucket "$b" --max-items 1000 --output json 2>/dev/null || echo '{}')
      local objs; objs=$(jq '{Objects: ([.Versions[]?, .DeleteMarkers[]?] | map({Key, VersionId})), Quiet: true}' <<<"$page")
      [[ $(jq '.Objects | length' <<<"$objs") -gt 0 ]] || break
      aws s3api delete-objects --bucket "$b" --delete "$objs" >/dev/null
    done
  done
  $TF apply -input=false -auto-approve -var-file="$STATE/terraform.tfvars.json" -var deletion_protection=false -target=module.database >/dev/null
  $TF destroy -input=false -auto-approve -var-file="$STATE/terraform.tfvars.json" -var deletion_protection=false
  rm -rf "$STATE"
  echo "aws: down; $STATE removed (device keys included)"
}

case ${1:-} in
  check) check ;;
  up) up ;;
  down) down ;;
  *) echo "usage: deploy/aws/stack.sh check|up|down" >&2; exit 2 ;;
esac
