# Two buckets: signed model bundles (the fleet's [models] store = "gs://<bucket>/models") and
# the data lake (the fleet's exports). Both: uniform bucket-level access (no object ACLs),
# public access prevention enforced, versioning with a bounded history, optional CMEK. Names
# carry the project ID (bucket names are global).

locals {
  buckets = {
    models = {
      name    = "${var.project_id}-${var.name}-models"
      archive = false
      purpose = "signed model bundles"
    }
    lake = {
      name    = "${var.project_id}-${var.name}-lake"
      archive = true
      purpose = "the data lake"
    }
  }
}

resource "google_storage_bucket" "ember" {
  # checkov:skip=CKV_GCP_62: usage logs to another bucket are superseded by Cloud Audit Logs (data access logs for storage.googleapis.com, enable them in the project's audit config); an access-log bucket would itself be unlogged
  for_each                    = local.buckets
  name                        = each.value.name
  location                    = var.region
  storage_class               = "STANDARD"
  uniform_bucket_level_access = true
  public_access_prevention    = "enforced"
  force_destroy               = false
  labels                      = merge(local.labels, { purpose = each.key })

  versioning {
    enabled = true
  }

  # Old versions are kept var.noncurrent_versions_kept_days, then deleted.
  lifecycle_rule {
    condition {
      days_since_noncurrent_time = var.noncurrent_versions_kept_days
      with_state                 = "ARCHIVED"
    }
    action {
      type = "Delete"
    }
  }
  lifecycle_rule {
    condition {
      age = 7
    }
    action {
      type = "AbortIncompleteMultipartUpload"
    }
  }
  # The lake's objects move to Archive after var.lake_archive_after_days.
  dynamic "lifecycle_rule" {
    for_each = each.value.archive ? [var.lake_archive_after_days] : []
    content {
      condition {
        age = lifecycle_rule.value
      }
      action {
        type          = "SetStorageClass"
        storage_class = "ARCHIVE"
      }
    }
  }

  dynamic "encryption" {
    for_each = local.kms == null ? [] : [local.kms]
    content {
      default_kms_key_name = encryption.value
    }
  }

  depends_on = [google_project_service.apis]
}
