# A small regional GKE Standard cluster: private nodes (no public addresses), control plane
# reachable only from var.master_authorized_cidrs, Workload Identity, shielded nodes, Dataplane V2
# (which enforces Kubernetes NetworkPolicy), one autoscaled node pool on a minimal service
# account. Standard rather than Autopilot so that each of these properties is stated here (and
# checked by deploy/tests/test_cloud_structure.py) rather than implied.

resource "google_service_account" "nodes" {
  account_id   = "${var.name}-gke-nodes"
  display_name = "Ember GKE nodes (logs, metrics, image pulls only)"
}

# What a node needs, nothing more (Google's "least privilege node service account").
resource "google_project_iam_member" "nodes" {
  for_each = toset([
    "roles/logging.logWriter",
    "roles/monitoring.metricWriter",
    "roles/monitoring.viewer",
    "roles/stackdriver.resourceMetadata.writer",
  ])
  project = var.project_id
  role    = each.value
  member  = "serviceAccount:${google_service_account.nodes.email}"
}

resource "google_artifact_registry_repository_iam_member" "nodes_pull" {
  location   = google_artifact_registry_repository.images.location
  repository = google_artifact_registry_repository.images.name
  role       = "roles/artifactregistry.reader"
  member     = "serviceAccount:${google_service_account.nodes.email}"
}

resource "google_container_cluster" "ember" {
  # checkov:skip=CKV_GCP_12: network policy is enforced by Dataplane V2 (datapath_provider = ADVANCED_DATAPATH); the legacy Calico network_policy block conflicts with it
  # checkov:skip=CKV_GCP_65: RBAC through Google Groups needs a Workspace domain; set var.gke_security_group to use it (authenticator_groups_config below)
  name     = "${var.name}-gke"
  location = var.region

  network         = google_compute_network.vpc.id
  subnetwork      = google_compute_subnetwork.nodes.id
  networking_mode = "VPC_NATIVE"
  ip_allocation_policy {
    cluster_secondary_range_name  = "pods"
    services_secondary_range_name = "services"
  }
  datapath_provider           = "ADVANCED_DATAPATH"
  enable_intranode_visibility = true

  private_cluster_config {
    enable_private_nodes    = true
    enable_private_endpoint = false
    master_ipv4_cidr_block  = "172.16.0.0/28"
  }
  master_authorized_networks_config {
    dynamic "cidr_blocks" {
      for_each = var.master_authorized_cidrs
      content {
        cidr_block   = cidr_blocks.value
        display_name = "operator-${cidr_blocks.key}"
      }
    }
  }

  workload_identity_config {
    workload_pool = local.wi_pool
  }
  enable_shielded_nodes = true
  enable_legacy_abac    = false
  master_auth {
    client_certificate_config {
      issue_client_certificate = false
    }
  }
  binary_authorization {
    evaluation_mode = "PROJECT_SINGLETON_POLICY_ENFORCE"
  }
  dynamic "authenticator_groups_config" {
    for_each = var.gke_security_group == "" ? [] : [var.gke_security_group]
    content {
      security_group = authenticator_groups_config.value
    }
  }
  release_channel {
    channel = "REGULAR"
  }
  logging_service    = "logging.googleapis.com/kubernetes"
  monitoring_service = "monitoring.googleapis.com/kubernetes"
  resource_labels    = local.labels

  # The default pool is replaced by the one below (its settings are stated there); this
  # node_config only governs the throw-away default node.
  remove_default_node_pool = true
  initial_node_count       = 1
  node_config {
    service_account = google_service_account.nodes.email
    oauth_scopes    = ["https://www.googleapis.com/auth/cloud-platform"]
    image_type      = "COS_CONTAINERD"
    metadata = {
      disable-legacy-endpoints = "true"
    }
    workload_metadata_config {
      mode = "GKE_METADATA"
    }
    shielded_instance_config {
      enable_secure_boot          = true
      enable_integrity_monitoring = true
    }
  }

  deletion_protection = var.deletion_protection
  depends_on          = [google_project_service.apis, google_project_iam_member.nodes]
}

resource "google_container_node_pool" "default" {
  name     = "${var.name}-pool"
  cluster  = google_container_cluster.ember.id
  location = var.region

  initial_node_count = 1
  autoscaling {
    min_node_count = 1
    max_node_count = var.node_count_max
  }
  management {
    auto_repair  = true
    auto_upgrade = true
  }

  node_config {
    machine_type    = var.node_machine_type
    disk_size_gb    = 50
    disk_type       = "pd-balanced"
    image_type      = "COS_CONTAINERD"
    service_account = google_service_account.nodes.email
    oauth_scopes    = ["https://www.googleapis.com/auth/cloud-platform"]
    labels          = local.labels
    metadata = {
      disable-legacy-endpoints = "true"
    }
    workload_metadata_config {
      mode = "GKE_METADATA"
    }
    shielded_instance_config {
      enable_secure_boot          = true
      enable_integrity_monitoring = true
    }
  }
}
