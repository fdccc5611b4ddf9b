#!/usr/bin/env bash
# Offline validation of the deployment files (a step of scripts/test.sh; no cluster, no cloud):
#   * every kustomize overlay renders and passes a strict schema check (kubernetes-validate
#     --strict, Kubernetes 1.32 schemas bundled in the package: no download);
#   * checkov (offline: --skip-download) over the Terraform, the Dockerfiles and the rendered manifests: zero failed checks
#     (a check that does not apply is skipped inline where it would fail, with the reason);
#   * yamllint over every YAML file of deploy/ and the rendered manifests;
#   * terraform fmt -check and terraform validate (terraform/local: builtin provider only, no
#     download);
#   * structure tests of terraform/gcp and terraform/azure (test_cloud_structure.py: their
#     providers cannot be downloaded here, so validate/plan cannot run; it parses the HCL and
#     asserts the security properties, each against a mutant that must fail it);
#   * scripts/up.sh and down.sh for gcp and azure: their prerequisite checks (test_cloud_scripts.sh,
#     fake gcloud/az/terraform on PATH: no cloud account);
#   * terraform/aws: init against the machine image's local provider mirror (no download),
#     validate, and terraform test (tests/*.tftest.hcl with mock_provider "aws": device policy
#     confined to its own thing, private encrypted buckets, private RDS, least-privilege IRSA,
#     the agent profile's shape);
#   * a syntax check (bash -n, sh -n) of the deploy scripts.
# Ends with a cargo-style "test result:" line that scripts/test.sh counts.
set -uo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$ROOT"
VENV=${EMBER_DEPLOY_VENV:-$HOME/.cache/ember/deploy-venv}
K8S_VERSION=1.32.0
OUT=$(mktemp -d /tmp/ember-validate.XXXXXX)
trap 'rm -rf "$OUT"' EXIT
passed=0 failed=0 failures=()

check() { # name command...
  local name=$1; shift
  echo "--- check validate::$name"
  if "$@" >"$OUT/$name.log" 2>&1; then
    passed=$((passed + 1)); echo "test validate::$name ... ok"
    tail -3 "$OUT/$name.log"
  else
    failed=$((failed + 1)); failures+=("$name"); echo "test validate::$name ... FAILED"
    tail -60 "$OUT/$name.log"
  fi
}

for t in "$VENV/bin/checkov" "$VENV/bin/kubernetes-validate" "$VENV/bin/yamllint"; do
  [[ -x $t ]] || { echo "validate: $t is missing: run bash scripts/install-deps.sh" >&2; echo "test result: FAILED. 0 passed; 1 failed; 0 ignored"; exit 1; }
done
command -v kubectl >/dev/null || { echo "validate: kubectl is missing (its kustomize renders the overlays): apt-get install kubectl, or bash scripts/install-deps.sh" >&2; echo "test result: FAILED. 0 passed; 1 failed; 0 ignored"; exit 1; }
command -v terraform >/dev/null || { echo "validate: terraform is missing (it ships with the machine image)" >&2; echo "test result: FAILED. 0 passed; 1 failed; 0 ignored"; exit 1; }

mkdir -p "$OUT/rendered"
for overlay in deploy/k8s/overlays/*/; do
  env=$(basename "$overlay")
  check "kustomize_$env" bash -c "kubectl kustomize '$overlay' >'$OUT/rendered/$env.yaml'"
  check "schema_$env" "$VENV/bin/kubernetes-validate" --strict --kubernetes-version "$K8S_VERSION" "$OUT/rendered/$env.yaml"
done
check yamllint "$VENV/bin/yamllint" --strict -c deploy/.yamllint deploy "$OUT/rendered"
check checkov_terraform "$VENV/bin/checkov" --quiet --compact --skip-download --framework terraform -d terraform
check checkov_dockerfiles "$VENV/bin/checkov" --quiet --compact --skip-download --framework dockerfile -d deploy
check checkov_kubernetes "$VENV/bin/checkov" --quiet --compact --skip-download --framework kubernetes -d "$OUT/rendered"
check terraform_fmt terraform fmt -check -recursive terraform
check terraform_validate bash -c "TF_DATA_DIR='$OUT/tf' terraform -chdir=terraform/local init -backend=false -input=false >/dev/null && TF_DATA_DIR='$OUT/tf' terraform -chdir=terraform/local validate"
check cloud_structure "$VENV/bin/python" deploy/tests/test_cloud_structure.py
check cloud_scripts bash deploy/tests/test_cloud_scripts.sh
# terraform/aws needs hashicorp/aws: a filesystem mirror (EMBER_TF_MIRROR, default the machine
# image's /opt/tf-plugins) stands in for the registry; the lock file it writes is not kept.
TF_MIRROR=${EMBER_TF_MIRROR:-/opt/tf-plugins}
printf 'provider_installation {\n  filesystem_mirror {\n    path    = "%s"\n    include = ["registry.terraform.io/hashicorp/aws"]\n  }\n  direct {\n    exclude = ["registry.terraform.io/hashicorp/aws"]\n  }\n}\n' "$TF_MIRROR" >"$OUT/aws.tfrc"
AWS_TF="TF_CLI_CONFIG_FILE='$OUT/aws.tfrc' TF_DATA_DIR='$OUT/tf-aws' terraform -chdir=terraform/aws"
check terraform_aws_mirror test -d "$TF_MIRROR/registry.terraform.io/hashicorp/aws"
check terraform_aws_validate bash -c "$AWS_TF init -backend=false -input=false >/dev/null && $AWS_TF validate -no-color"
check terraform_aws_test bash -c "$AWS_TF test -no-color"
rm -f terraform/aws/.terraform.lock.hcl
check shell_syntax bash -c 'for f in deploy/build-images.sh deploy/base/*.sh deploy/local/*.sh deploy/aws/*.sh deploy/cloud/*.sh deploy/tests/*.sh scripts/up.sh scripts/down.sh; do bash -n "$f" || exit 1; done; sh -n deploy/postgres/entrypoint.sh'

[[ $failed -eq 0 ]] || echo "failures: ${failures[*]}"
if [[ $failed -eq 0 ]]; then
  echo "test result: ok. $passed passed; 0 failed; 0 ignored"
else
  echo "test result: FAILED. $passed passed; $failed failed; 0 ignored"
  exit 1
fi
