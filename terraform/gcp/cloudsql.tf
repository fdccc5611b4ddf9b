# Cloud SQL for PostgreSQL 15 (the version of the local stack): a private address in the VPC
# only (no public IP, no authorized networks), TLS with a client certificate only (the Auth
# Proxy presents one for every connection it opens), automated backups
# with point-in-time recovery, IAM database authentication available. The fleet reaches it
# through the Cloud SQL Auth Proxy sidecar of deploy/k8s/overlays/gcp (roles/cloudsql.client
# via Workload Identity), which also provides the TLS and the client certificate. The `ember`
# user's password is set by scripts/up.sh with gcloud, so it is never in Terraform's state.

resource "google_sql_database_instance" "ember" {
  # checkov:skip=CKV_GCP_79: PostgreSQL 15 on purpose: the version the fleet is tested against (deploy/postgres, the local stack); raise with the local image
  name                = "${var.name}-pg"
  database_version    = "POSTGRES_15"
  region              = var.region
  deletion_protection = var.deletion_protection
  encryption_key_name = local.kms

  settings {
    tier                        = var.db_tier
    edition                     = "ENTERPRISE"
    availability_type           = var.db_high_availability ? "REGIONAL" : "ZONAL"
    disk_type                   = "PD_SSD"
    disk_autoresize             = true
    deletion_protection_enabled = var.deletion_protection
    user_labels                 = local.labels

    ip_configuration {
      ipv4_enabled                                  = false
      private_network                               = google_compute_network.vpc.id
      enable_private_path_for_google_cloud_services = true
      ssl_mode                                      = "TRUSTED_CLIENT_CERTIFICATE_REQUIRED"
    }

    backup_configuration {
      enabled                        = true
      start_time                     = "02:00"
      point_in_time_recovery_enabled = true
      transaction_log_retention_days = 7
      backup_retention_settings {
        retained_backups = 14
        retention_unit   = "COUNT"
      }
    }

    maintenance_window {
      day          = 7
      hour         = 3
      update_track = "stable"
    }

    insights_config {
      query_insights_enabled  = true
      record_application_tags = false
      record_client_address   = false
    }

    # IAM database authentication, and the logging flags of the CIS benchmark for Cloud SQL.
    database_flags {
      name  = "cloudsql.iam_authentication"
      value = "on"
    }
    database_flags {
      name  = "log_checkpoints"
      value = "on"
    }
    database_flags {
      name  = "log_connections"
      value = "on"
    }
    database_flags {
      name  = "log_disconnections"
      value = "on"
    }
    database_flags {
      name  = "log_lock_waits"
      value = "on"
    }
    database_flags {
      name  = "log_min_messages"
      value = "error"
    }
    database_flags {
      name  = "log_temp_files"
      value = "0"
    }
    database_flags {
      name  = "log_min_duration_statement"
      value = "-1"
    }
    database_flags {
      name  = "log_statement"
      value = "ddl"
    }
    database_flags {
      name  = "log_duration"
      value = "on"
    }
    database_flags {
      name  = "log_hostname"
      value = "on"
    }
    database_flags {
      name  = "log_min_error_statement"
      value = "error"
    }
    database_flags {
      name  = "cloudsql.enable_pgaudit"
      value = "on"
    }
  }

  depends_on = [google_service_networking_connection.private_services]
}

resource "google_sql_database" "ember" {
  name     = "ember"
  instance = google_sql_database_instance.ember.name
}
