# One service account per service, each with only what it does.
resource "google_service_account" "runtime" {
  for_each     = toset(["serve", "worker"])
  account_id   = "${var.name}-${each.key}"
  display_name = "utxoiq persistence worker: ${each.key}"
}

# Pub/Sub signs its push requests as this account (OIDC); `serve` accepts no other.
resource "google_service_account" "push" {
  account_id   = "${var.name}-push"
  display_name = "utxoiq persistence worker: Pub/Sub push identity"
}

locals {
  # Project-wide only where Google offers no narrower grant: Cloud SQL connections,
  # and writing the services' own logs, metrics and traces.
  runtime_project_roles = [
    "roles/cloudsql.client",
    "roles/logging.logWriter",
    "roles/monitoring.metricWriter",
    "roles/cloudtrace.agent",
  ]
}

resource "google_project_iam_member" "runtime" {
  for_each = {
    for pair in setproduct(["serve", "worker"], local.runtime_project_roles) :
    "${pair[0]}/${pair[1]}" => { account = pair[0], role = pair[1] }
  }
  project = var.project_id
  role    = each.value.role
  member  = google_service_account.runtime[each.value.account].member
}

resource "google_storage_bucket_iam_member" "runtime" {
  for_each = {
    for pair in setproduct(["serve", "worker"], ["backups", "archives"]) :
    "${pair[0]}/${pair[1]}" => { account = pair[0], bucket = pair[1] }
  }
  bucket = each.value.bucket == "backups" ? google_storage_bucket.backups.name : google_storage_bucket.archives.name
  role   = "roles/storage.objectAdmin"
  member = google_service_account.runtime[each.value.account].member
}

resource "google_secret_manager_secret_iam_member" "runtime" {
  for_each = {
    for pair in setproduct(["serve", "worker"], keys(google_secret_manager_secret.config)) :
    "${pair[0]}/${pair[1]}" => { account = pair[0], secret = pair[1] }
  }
  secret_id = google_secret_manager_secret.config[each.value.secret].id
  role      = "roles/secretmanager.secretAccessor"
  member    = google_service_account.runtime[each.value.account].member
}

# Pub/Sub's push identity may invoke `serve`, and nothing else.
resource "google_cloud_run_v2_service_iam_member" "push_invokes_serve" {
  count    = local.push ? 1 : 0
  name     = module.serve.name
  location = module.serve.location
  role     = "roles/run.invoker"
  member   = google_service_account.push.member
}

resource "google_cloud_run_v2_service_iam_member" "read_api_invokers" {
  for_each = toset(var.read_api_invokers)
  name     = module.serve.name
  location = module.serve.location
  role     = "roles/run.invoker"
  member   = each.value
}
