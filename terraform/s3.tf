# The artifact bucket: datasets, checkpoints, sweeps, the model registry and eval reports, all under
# s3://<bucket>/<storage_prefix>/ (conf/storage/s3.yaml). Private, versioned, KMS-encrypted, TLS only, every request
# logged to the access-log bucket (s3_access_logs.tf).

locals {
  bucket_name = coalesce(var.bucket_name, "${var.name}-${local.account_id}-${var.region}")
  prefix      = var.storage_prefix
}

resource "aws_s3_bucket" "artifacts" {
  #checkov:skip=CKV_AWS_144:Cross-region replication doubles storage cost for re-creatable training artifacts; enable it per account if required.
  #checkov:skip=CKV2_AWS_62:Nothing consumes bucket events; stages mark completion with a record object (manifest.json, lineage.json) instead.
  bucket        = local.bucket_name
  force_destroy = var.force_destroy_bucket
}

resource "aws_s3_bucket_ownership_controls" "artifacts" {
  bucket = aws_s3_bucket.artifacts.id

  rule {
    object_ownership = "BucketOwnerEnforced"
  }
}

resource "aws_s3_bucket_public_access_block" "artifacts" {
  bucket = aws_s3_bucket.artifacts.id

  block_public_acls       = true
  block_public_policy     = true
  ignore_public_acls      = true
  restrict_public_buckets = true
}

resource "aws_s3_bucket_versioning" "artifacts" {
  bucket = aws_s3_bucket.artifacts.id

  versioning_configuration {
    status = "Enabled"
  }
}

resource "aws_s3_bucket_server_side_encryption_configuration" "artifacts" {
  bucket = aws_s3_bucket.artifacts.id

  rule {
    apply_server_side_encryption_by_default {
      sse_algorithm     = "aws:kms"
      kms_master_key_id = aws_kms_key.this.arn
    }
    # S3 Bucket Keys cut KMS requests (and cost) for the many small shard and checkpoint objects.
    bucket_key_enabled = true
  }
}

resource "aws_s3_bucket_lifecycle_configuration" "artifacts" {
  bucket = aws_s3_bucket.artifacts.id

  # Lifecycle rules act on versions, so versioning must be on first.
  depends_on = [aws_s3_bucket_versioning.artifacts]

  # Checkpoints and sweeps are large and rarely read once a run is finished: move them to Standard-IA.
  rule {
    id     = "checkpoints-to-infrequent-access"
    status = "Enabled"

    filter {
      prefix = "${local.prefix}/runs/"
    }

    transition {
      days          = var.checkpoint_ia_transition_days
      storage_class = "STANDARD_IA"
    }
  }

  rule {
    id     = "sweeps-to-infrequent-access"
    status = "Enabled"

    filter {
      prefix = "${local.prefix}/sweeps/"
    }

    transition {
      days          = var.checkpoint_ia_transition_days
      storage_class = "STANDARD_IA"
    }
  }

  # Old checkpoints that Ray Train prunes (CheckpointConfig.num_to_keep) and replaced registry pointers become
  # noncurrent versions; keep them a short while for recovery, then delete them.
  rule {
    id     = "expire-noncurrent-versions"
    status = "Enabled"

    filter {}

    noncurrent_version_expiration {
      noncurrent_days = var.noncurrent_version_expiration_days
    }

    abort_incomplete_multipart_upload {
      days_after_initiation = 7
    }
  }
}

# TLS only: refuse any request that is not over HTTPS.
data "aws_iam_policy_document" "artifacts_bucket" {
  statement {
    sid     = "DenyInsecureTransport"
    effect  = "Deny"
    actions = ["s3:*"]
    resources = [
      aws_s3_bucket.artifacts.arn,
      "${aws_s3_bucket.artifacts.arn}/*",
    ]
    principals {
      type        = "*"
      identifiers = ["*"]
    }
    condition {
      test     = "Bool"
      variable = "aws:SecureTransport"
      values   = ["false"]
    }
  }
}

resource "aws_s3_bucket_policy" "artifacts" {
  bucket = aws_s3_bucket.artifacts.id
  policy = data.aws_iam_policy_document.artifacts_bucket.json

  depends_on = [aws_s3_bucket_public_access_block.artifacts]
}
