output "broker_ip" {
  description = "The broker's reserved public address (L4 passthrough load balancer, port 8883, mutual TLS)."
  value       = google_compute_address.broker.address
}

output "broker_endpoint" {
  description = "What devices connect to."
  value       = "mqtts://${local.broker_host}:8883"
}

output "agent_profile_file" {
  description = "The agent profile (host, port, CA, topics): merge it into each device's agent.toml."
  value       = local_file.agent_profile.filename
}

output "kustomization_dir" {
  description = "The generated kustomization (deploy/k8s/overlays/gcp with this project's names): kubectl apply -k it."
  value       = dirname(local_file.kustomization.filename)
}

output "cluster_name" {
  description = "The GKE cluster (gcloud container clusters get-credentials NAME --region REGION)."
  value       = google_container_cluster.ember.name
}

output "region" {
  description = "The region everything is in."
  value       = var.region
}

output "cloudsql_instance" {
  description = "The Cloud SQL instance's connection name (PROJECT:REGION:NAME), for the Auth Proxy."
  value       = google_sql_database_instance.ember.connection_name
}

output "cloudsql_instance_name" {
  description = "The Cloud SQL instance's name (gcloud sql users ... --instance NAME)."
  value       = google_sql_database_instance.ember.name
}

output "image_registry" {
  description = "Where scripts/up.sh pushes ember-fleet and ember-mosquitto."
  value       = local.registry
}

output "buckets" {
  description = "The bucket names (models, lake); scripts/down.sh empties them before destroy."
  value       = { for k, b in google_storage_bucket.ember : k => b.name }
}

output "pubsub" {
  description = "Topic and subscription names."
  value = {
    topic                    = google_pubsub_topic.ingest.name
    subscription             = google_pubsub_subscription.fleet.name
    dead_letter_topic        = google_pubsub_topic.dead_letter.name
    dead_letter_subscription = google_pubsub_subscription.dead_letter.name
  }
}

output "bigquery_tables" {
  description = "The analytics tables (dataset.table)."
  value       = { for k, t in google_bigquery_table.channel : k => "${t.project}.${t.dataset_id}.${t.table_id}" }
}

output "service_accounts" {
  description = "The Google service accounts the KSAs act as (Workload Identity)."
  value = {
    fleet  = google_service_account.fleet.email
    bridge = google_service_account.bridge.email
  }
}
