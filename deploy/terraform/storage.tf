# Backups: the worker writes, verifies and prunes them (BACKUP_RETENTION_DAYS). The
# bucket's rule is only a safety net a few days later, for a worker that stopped
# pruning. No versioning: a pruned backup must be gone, not kept as a noncurrent
# version, and objects are never overwritten (names are unique per run). No soft
# delete either, for the same reason.
resource "google_storage_bucket" "backups" {
  #checkov:skip=CKV_GCP_78:versioning would keep every pruned backup as a noncurrent version; objects are write-once (unique names), so there is nothing to protect from overwrite
  name                        = "${var.project_id}-${var.name}-backups"
  location                    = var.bucket_location
  uniform_bucket_level_access = true
  public_access_prevention    = "enforced"
  force_destroy               = false

  versioning {
    enabled = false
  }
  soft_delete_policy {
    retention_duration_seconds = 0
  }
  lifecycle_rule {
    condition {
      age = var.backup_retention_days + var.backup_deletion_margin_days
    }
    action {
      type = "Delete"
    }
  }
  dynamic "logging" {
    for_each = var.log_bucket == "" ? [] : [var.log_bucket]
    content {
      log_bucket        = logging.value
      log_object_prefix = "backups/"
    }
  }
}

# Archives: cold storage of what retention removed from PostgreSQL, kept for good and
# moved to colder classes as they age. Object names are deterministic per key range:
# a rerun writes the same object, so versioning would only keep identical copies.
resource "google_storage_bucket" "archives" {
  #checkov:skip=CKV_GCP_78:archive objects are deterministic per key range and written once (a rerun writes the same bytes); versions would be identical copies
  name                        = "${var.project_id}-${var.name}-archives"
  location                    = var.bucket_location
  uniform_bucket_level_access = true
  public_access_prevention    = "enforced"
  force_destroy               = false

  versioning {
    enabled = false
  }
  lifecycle_rule {
    condition {
      age = var.archive_coldline_after_days
    }
    action {
      type          = "SetStorageClass"
      storage_class = "COLDLINE"
    }
  }
  lifecycle_rule {
    condition {
      age = var.archive_archive_after_days
    }
    action {
      type          = "SetStorageClass"
      storage_class = "ARCHIVE"
    }
  }
  dynamic "logging" {
    for_each = var.log_bucket == "" ? [] : [var.log_bucket]
    content {
      log_bucket        = logging.value
      log_object_prefix = "archives/"
    }
  }
}
