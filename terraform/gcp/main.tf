# Ember on Google Cloud: devices connect with mutual TLS to Mosquitto on GKE (behind an L4
# passthrough load balancer, so the device certificate reaches the broker); `ember-fleet bridge`
# moves every message into Pub/Sub (device id = ordering key); the fleet reads its Pub/Sub
# subscription and stores into Cloud SQL for PostgreSQL; a BigQuery subscription lands telemetry
# and inference results in BigQuery; model bundles and the data lake are Cloud Storage buckets.
#
#   scripts/up.sh gcp      # prerequisites, terraform apply, PKI, secrets, kubectl apply
#   scripts/down.sh gcp    # empties the buckets, terraform destroy, removes local state
#
# No service-account key exists anywhere: workloads get Google credentials through Workload
# Identity; the database password is set by scripts/up.sh with gcloud (not in Terraform's state).
# docs/deploy-gcp.md is the guide (architecture, variables, cost, what was not tested).

locals {
  repo      = abspath("${path.module}/../..")
  state_dir = var.state_dir != "" ? var.state_dir : "${local.repo}/deploy/.state/gcp"
  labels = {
    app        = "ember"
    managed-by = "terraform"
  }
  # The Kubernetes service accounts of deploy/k8s/overlays/gcp and the Google service
  # accounts they act as (Workload Identity).
  wi_pool = "${var.project_id}.svc.id.goog"
  ksa = {
    fleet  = "ember-fleet"
    bridge = "ember-bridge"
  }
  kms = var.kms_key_name == "" ? null : var.kms_key_name

  apis = [
    "artifactregistry.googleapis.com",
    "bigquery.googleapis.com",
    "binaryauthorization.googleapis.com",
    "cloudresourcemanager.googleapis.com",
    "compute.googleapis.com",
    "container.googleapis.com",
    "iam.googleapis.com",
    "pubsub.googleapis.com",
    "servicenetworking.googleapis.com",
    "sqladmin.googleapis.com",
    "storage.googleapis.com",
  ]
}

data "google_project" "this" {
  project_id = var.project_id
}

# scripts/up.sh enables these before the first plan (a plan needs some of them); declared here
# too so that the configuration stands alone. Never disabled on destroy: other things in the
# project may use them.
resource "google_project_service" "apis" {
  for_each           = toset(local.apis)
  project            = var.project_id
  service            = each.value
  disable_on_destroy = false
}

# The images: ember-fleet (fleet, bridge, migrations) and ember-mosquitto, pushed by
# scripts/up.sh from deploy/build-images.sh's local builds.
resource "google_artifact_registry_repository" "images" {
  # checkov:skip=CKV_GCP_84: CMEK is optional (var.kms_key_name); the images hold no secret (docs/deploy.md, Invariant), Google-managed encryption by default
  location      = var.region
  repository_id = var.name
  description   = "Ember container images (ember-fleet, ember-mosquitto)"
  format        = "DOCKER"
  kms_key_name  = local.kms
  depends_on    = [google_project_service.apis]
}
