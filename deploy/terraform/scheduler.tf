# Cloud Scheduler publishes CONTRACT.md's maintenance requests; the worker's
# once-per-day rule makes a retried or duplicated request harmless.
resource "google_cloud_scheduler_job" "maintenance" {
  for_each    = local.maintenance_tasks
  name        = "${var.name}-${each.key}"
  description = "Daily ${each.key} request on the maintenance topic"
  region      = var.region
  schedule    = each.value.schedule
  time_zone   = "Etc/UTC"

  pubsub_target {
    topic_name = google_pubsub_topic.topics["maintenance"].id
    data       = base64encode(jsonencode(each.value.body))
  }
}
