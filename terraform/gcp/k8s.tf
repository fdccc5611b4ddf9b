# What the cluster runs comes from deploy/k8s/overlays/gcp; this file writes, under
# deploy/.state/gcp/k8s, the kustomization that takes that overlay with this project's names (image
# registry, Workload Identity service accounts, Cloud SQL instance, broker address, fleet
# configuration), and the agent profile. Neither file holds a secret.

locals {
  registry    = "${var.region}-docker.pkg.dev/${var.project_id}/${google_artifact_registry_repository.images.repository_id}"
  broker_host = var.broker_dns_name != "" ? var.broker_dns_name : google_compute_address.broker.address
  # Always inside the repository: kustomize takes the overlay by a relative path only.
  k8s_dir = "${local.repo}/deploy/.state/gcp/k8s"
}

resource "local_file" "fleet_toml" {
  filename        = "${local.k8s_dir}/fleet.toml"
  file_permission = "0644"
  content = templatefile("${path.module}/templates/fleet.toml.tftpl", {
    models_bucket     = google_storage_bucket.ember["models"].name
    subscription      = google_pubsub_subscription.fleet.id
    dead_letter_topic = google_pubsub_topic.dead_letter.id
  })
}

resource "local_file" "kustomization" {
  filename        = "${local.k8s_dir}/kustomization.yaml"
  file_permission = "0644"
  content = templatefile("${path.module}/templates/kustomization.yaml.tftpl", {
    overlay         = "${local.repo}/deploy/k8s/overlays/gcp"
    namespace       = var.namespace
    registry        = local.registry
    fleet_gsa       = google_service_account.fleet.email
    bridge_gsa      = google_service_account.bridge.email
    instance        = google_sql_database_instance.ember.connection_name
    broker_ip       = google_compute_address.broker.address
    source_ranges   = var.device_source_cidrs
    topic           = google_pubsub_topic.ingest.id
    bridge_replicas = var.bridge_replicas
    fleet_toml_sha  = sha256(local_file.fleet_toml.content)
  })
}

resource "local_file" "agent_profile" {
  filename        = "${local.state_dir}/agent-profile.toml"
  file_permission = "0644"
  content = templatefile("${path.module}/templates/agent-profile.toml.tftpl", {
    project_id = var.project_id
    host       = local.broker_host
    ca_file    = "${local.state_dir}/pki/ca.pem"
    topic      = google_pubsub_topic.ingest.id
  })
}
