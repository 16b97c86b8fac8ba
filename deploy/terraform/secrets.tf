# The URLs' values are added out of band (README: Deploy to Google Cloud, step 3), so
# that no credential ever sits in Terraform state. The collector's configuration holds
# none: Terraform writes it, and Cloud Run mounts it into the collector.
resource "google_secret_manager_secret" "config" {
  for_each  = toset(["database-url", "redis-url", "otel-collector-config"])
  secret_id = "${var.name}-${each.key}"
  replication {
    auto {}
  }
}

resource "google_secret_manager_secret_version" "otel_collector_config" {
  secret      = google_secret_manager_secret.config["otel-collector-config"].id
  secret_data = file("${path.module}/../otel-collector.yaml")
}
