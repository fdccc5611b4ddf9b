# The workloads' Google identities, with the minimum roles, each granted on the one resource it
# is needed on, and bound to their Kubernetes service accounts through Workload Identity.
# **Invariant:** no google_service_account_key exists in this configuration (nor is one made
# by scripts/up.sh): pods get short-lived tokens from the GKE metadata server.
#
#   ember-fleet  (KSA ember/ember-fleet):  pubsub.subscriber on the fleet subscription;
#                pubsub.publisher on the dead-letter topic (the copies of refused messages);
#                storage.objectAdmin on the models and lake buckets; cloudsql.client (through
#                the Auth Proxy sidecar), conditioned on the one instance
#   ember-bridge (KSA ember/ember-bridge): pubsub.publisher on the ingest topic

resource "google_service_account" "fleet" {
  account_id   = "${var.name}-fleet"
  display_name = "Ember fleet service (Workload Identity: ${var.namespace}/${local.ksa.fleet})"
}

resource "google_service_account" "bridge" {
  account_id   = "${var.name}-bridge"
  display_name = "Ember MQTT-to-Pub/Sub bridge (Workload Identity: ${var.namespace}/${local.ksa.bridge})"
}

# Workload Identity: the KSA may act as the GSA, nothing else may.
resource "google_service_account_iam_member" "fleet_workload_identity" {
  service_account_id = google_service_account.fleet.name
  role               = "roles/iam.workloadIdentityUser"
  member             = "serviceAccount:${local.wi_pool}[${var.namespace}/${local.ksa.fleet}]"
  depends_on         = [google_container_cluster.ember] # the pool exists once the cluster does
}

resource "google_service_account_iam_member" "bridge_workload_identity" {
  service_account_id = google_service_account.bridge.name
  role               = "roles/iam.workloadIdentityUser"
  member             = "serviceAccount:${local.wi_pool}[${var.namespace}/${local.ksa.bridge}]"
  depends_on         = [google_container_cluster.ember]
}

# Fleet: read (and acknowledge) its own subscription.
resource "google_pubsub_subscription_iam_member" "fleet_subscriber" {
  subscription = google_pubsub_subscription.fleet.id
  role         = "roles/pubsub.subscriber"
  member       = "serviceAccount:${google_service_account.fleet.email}"
}

# Fleet: copy the messages it refuses to the dead-letter topic (before acknowledging them).
resource "google_pubsub_topic_iam_member" "fleet_dead_letter_publisher" {
  topic  = google_pubsub_topic.dead_letter.id
  role   = "roles/pubsub.publisher"
  member = "serviceAccount:${google_service_account.fleet.email}"
}

# Fleet: the model store and the lake, these two buckets only.
resource "google_storage_bucket_iam_member" "fleet_objects" {
  for_each = google_storage_bucket.ember
  bucket   = each.value.name
  role     = "roles/storage.objectAdmin"
  member   = "serviceAccount:${google_service_account.fleet.email}"
}

# Fleet: connect to the one Cloud SQL instance (Cloud SQL has no instance-level IAM policy, so
# the project-level grant is narrowed by an IAM condition on the instance's name).
resource "google_project_iam_member" "fleet_cloudsql_client" {
  project = var.project_id
  role    = "roles/cloudsql.client"
  member  = "serviceAccount:${google_service_account.fleet.email}"
  condition {
    title       = "ember-cloudsql-instance-only"
    description = "Only the Ember PostgreSQL instance"
    expression  = "resource.name == \"projects/${var.project_id}/instances/${google_sql_database_instance.ember.name}\" && resource.service == \"sqladmin.googleapis.com\""
  }
}

# Bridge: publish to the ingest topic only.
resource "google_pubsub_topic_iam_member" "bridge_publisher" {
  topic  = google_pubsub_topic.ingest.id
  role   = "roles/pubsub.publisher"
  member = "serviceAccount:${google_service_account.bridge.email}"
}
