# One private, versioned, KMS-encrypted, TLS-only S3 bucket with a lifecycle. Ember uses two:
# model bundles (signed; the fleet serves them to agents) and the data lake (the fleet's
# exports, tiered to Standard-IA and Glacier Instant Retrieval as they age).
resource "aws_s3_bucket" "this" {
  #checkov:skip=CKV_AWS_18:server access logs would need a third bucket that logs itself; object-level access is recorded by CloudTrail data events where an account enables them
  #checkov:skip=CKV_AWS_144:cross-region replication is a disaster-recovery choice per deployment (bundles are re-uploaded from the registry, the lake re-exported from PostgreSQL); docs/deploy-aws.md says how to add it
  #checkov:skip=CKV2_AWS_62:nothing consumes bucket events; the fleet writes and reads these buckets itself
  bucket = var.bucket
}

resource "aws_s3_bucket_public_access_block" "this" {
  bucket                  = aws_s3_bucket.this.id
  block_public_acls       = true
  block_public_policy     = true
  ignore_public_acls      = true
  restrict_public_buckets = true
}

resource "aws_s3_bucket_ownership_controls" "this" {
  bucket = aws_s3_bucket.this.id
  rule {
    object_ownership = "BucketOwnerEnforced"
  }
}

resource "aws_s3_bucket_versioning" "this" {
  bucket = aws_s3_bucket.this.id
  versioning_configuration {
    status = "Enabled"
  }
}

resource "aws_s3_bucket_server_side_encryption_configuration" "this" {
  bucket = aws_s3_bucket.this.id
  rule {
    apply_server_side_encryption_by_default {
      sse_algorithm     = "aws:kms"
      kms_master_key_id = var.kms_key
    }
    bucket_key_enabled = true
  }
}

resource "aws_s3_bucket_lifecycle_configuration" "this" {
  bucket = aws_s3_bucket.this.id
  rule {
    id     = "tiering-and-old-versions"
    status = "Enabled"
    filter {}
    dynamic "transition" {
      for_each = var.ia_days == null ? [] : [var.ia_days]
      content {
        days          = transition.value
        storage_class = "STANDARD_IA"
      }
    }
    dynamic "transition" {
      for_each = var.glacier_days == null ? [] : [var.glacier_days]
      content {
        days          = transition.value
        storage_class = "GLACIER_IR"
      }
    }
    noncurrent_version_expiration {
      noncurrent_days = var.noncurrent_days
    }
    abort_incomplete_multipart_upload {
      days_after_initiation = 7
    }
  }
}

resource "aws_s3_bucket_policy" "tls_only" {
  bucket = aws_s3_bucket.this.id
  policy = jsonencode({
    Version = "2012-10-17"
    Statement = [{
      Sid       = "DenyPlainHttp"
      Effect    = "Deny"
      Principal = "*"
      Action    = "s3:*"
      Resource  = [aws_s3_bucket.this.arn, "${aws_s3_bucket.this.arn}/*"]
      Condition = { Bool = { "aws:SecureTransport" = "false" } }
    }]
  })
  depends_on = [aws_s3_bucket_public_access_block.this]
}
