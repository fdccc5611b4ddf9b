# Analytics: Pub/Sub BigQuery subscriptions write every telemetry and inference message into
# day-partitioned tables (no code in between). The message body is the Ember payload as sent
# (docs/protocol.md: JSON, or CBOR when the agent's mqtt.encoding = "cbor"), so `data` is BYTES;
# docs/deploy-gcp.md shows the queries that unpack the JSON form.

resource "google_bigquery_dataset" "analytics" {
  # checkov:skip=CKV_GCP_81: CMEK is optional (var.kms_key_name sets default_encryption_configuration); Google-managed encryption by default
  dataset_id                 = replace("${var.name}_analytics", "-", "_")
  friendly_name              = "Ember analytics"
  description                = "Telemetry and inference results from Pub/Sub (terraform/gcp)."
  location                   = var.region
  delete_contents_on_destroy = false
  labels                     = local.labels

  dynamic "default_encryption_configuration" {
    for_each = local.kms == null ? [] : [local.kms]
    content {
      kms_key_name = default_encryption_configuration.value
    }
  }
  depends_on = [google_project_service.apis]
}

locals {
  # The columns a BigQuery subscription with write_metadata fills, plus the payload.
  bq_schema = jsonencode([
    { name = "subscription_name", type = "STRING", mode = "NULLABLE" },
    { name = "message_id", type = "STRING", mode = "NULLABLE" },
    { name = "publish_time", type = "TIMESTAMP", mode = "NULLABLE" },
    { name = "data", type = "BYTES", mode = "NULLABLE", description = "The Ember payload as the device sent it (JSON or CBOR)." },
    { name = "attributes", type = "JSON", mode = "NULLABLE", description = "device, channel, encoding, mqtt_topic (set by ember-fleet bridge)." },
  ])
  bq_channels = ["telemetry", "inference"]
}

resource "google_bigquery_table" "channel" {
  # checkov:skip=CKV_GCP_80: CMEK is optional (var.kms_key_name sets encryption_configuration); Google-managed encryption by default
  for_each            = toset(local.bq_channels)
  dataset_id          = google_bigquery_dataset.analytics.dataset_id
  table_id            = each.value
  description         = "Ember ${each.value} messages, one row per MQTT message."
  schema              = local.bq_schema
  deletion_protection = var.deletion_protection
  labels              = local.labels

  time_partitioning {
    type          = "DAY"
    field         = "publish_time"
    expiration_ms = var.bigquery_table_expiration_days == 0 ? null : var.bigquery_table_expiration_days * 86400000
  }

  dynamic "encryption_configuration" {
    for_each = local.kms == null ? [] : [local.kms]
    content {
      kms_key_name = encryption_configuration.value
    }
  }
}

# The Pub/Sub service agent writes the rows: BigQuery Data Editor on these two tables only.
resource "google_bigquery_table_iam_member" "pubsub_writer" {
  for_each   = google_bigquery_table.channel
  dataset_id = each.value.dataset_id
  table_id   = each.value.table_id
  role       = "roles/bigquery.dataEditor"
  member     = local.pubsub_agent
}

resource "google_pubsub_subscription" "bq" {
  for_each = google_bigquery_table.channel
  name     = "${var.name}-bq-${each.key}"
  topic    = google_pubsub_topic.ingest.id
  filter   = "attributes.channel = \"${each.key}\""

  bigquery_config {
    table          = "${each.value.project}.${each.value.dataset_id}.${each.value.table_id}"
    write_metadata = true
  }
  message_retention_duration = var.pubsub_retention
  ack_deadline_seconds       = 60
  expiration_policy {
    ttl = ""
  }
  # Rows BigQuery refuses (e.g. a schema it cannot take) are not retried forever.
  dead_letter_policy {
    dead_letter_topic     = google_pubsub_topic.dead_letter.id
    max_delivery_attempts = var.max_delivery_attempts
  }
  labels     = local.labels
  depends_on = [google_bigquery_table_iam_member.pubsub_writer]
}
