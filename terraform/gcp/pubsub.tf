# The ingest pipe. `ember-fleet bridge` publishes every device message (telemetry, inference,
# status, heartbeat) to one topic with the device id as ordering key and the MQTT topic, channel
# and encoding as attributes; the fleet pulls its subscription (ordered per device, acked after
# the batch is committed); messages it cannot process land, after max_delivery_attempts, on
# the dead-letter topic, whose own subscription keeps them for inspection. Two BigQuery
# subscriptions copy telemetry and inference results into BigQuery (bigquery.tf).

resource "google_pubsub_topic" "ingest" {
  # checkov:skip=CKV_GCP_83: CMEK is optional (var.kms_key_name sets kms_key_name); Google-managed encryption by default
  name                       = "${var.name}-ingest"
  kms_key_name               = local.kms
  message_retention_duration = "86400s"
  message_storage_policy {
    allowed_persistence_regions = [var.region]
  }
  depends_on = [google_project_service.apis]
}

resource "google_pubsub_topic" "dead_letter" {
  # checkov:skip=CKV_GCP_83: CMEK is optional (var.kms_key_name sets kms_key_name); Google-managed encryption by default
  name                       = "${var.name}-ingest-dead-letter"
  kms_key_name               = local.kms
  message_retention_duration = "604800s"
  message_storage_policy {
    allowed_persistence_regions = [var.region]
  }
  depends_on = [google_project_service.apis]
}

# The fleet's subscription: every replica pulls from it (streaming pull shares it out).
resource "google_pubsub_subscription" "fleet" {
  name                    = "${var.name}-fleet"
  topic                   = google_pubsub_topic.ingest.id
  enable_message_ordering = true
  ack_deadline_seconds    = var.ack_deadline_seconds
  # Unacknowledged messages wait this long: a fleet outage shorter than this loses nothing.
  message_retention_duration = var.pubsub_retention
  retain_acked_messages      = false
  expiration_policy {
    ttl = "" # never expires, however long the fleet is away
  }
  retry_policy {
    minimum_backoff = "10s"
    maximum_backoff = "600s"
  }
  dead_letter_policy {
    dead_letter_topic     = google_pubsub_topic.dead_letter.id
    max_delivery_attempts = var.max_delivery_attempts
  }
  labels = local.labels
}

# What the fleet could never process, kept for inspection and replay (7 days).
resource "google_pubsub_subscription" "dead_letter" {
  name                       = "${var.name}-ingest-dead-letter"
  topic                      = google_pubsub_topic.dead_letter.id
  ack_deadline_seconds       = 60
  message_retention_duration = "604800s"
  expiration_policy {
    ttl = ""
  }
  labels = local.labels
}

# Dead-lettering is done by the Pub/Sub service agent: it must publish to the dead-letter
# topic and acknowledge on the source subscriptions (Google's documented grants, on these
# resources only).
locals {
  pubsub_agent = "serviceAccount:service-${data.google_project.this.number}@gcp-sa-pubsub.iam.gserviceaccount.com"
}

resource "google_pubsub_topic_iam_member" "dead_letter_publisher" {
  topic  = google_pubsub_topic.dead_letter.id
  role   = "roles/pubsub.publisher"
  member = local.pubsub_agent
}

resource "google_pubsub_subscription_iam_member" "dead_letter_subscriber" {
  for_each = {
    fleet     = google_pubsub_subscription.fleet.id
    telemetry = google_pubsub_subscription.bq["telemetry"].id
    inference = google_pubsub_subscription.bq["inference"].id
  }
  subscription = each.value
  role         = "roles/pubsub.subscriber"
  member       = local.pubsub_agent
}
