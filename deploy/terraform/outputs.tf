output "serve_url" {
  description = "URL of `serve` (push endpoint base and read API)."
  value       = module.serve.uri
}

output "worker_service" {
  description = "Name of the pull worker service (null in push mode)."
  value       = local.push ? null : module.worker[0].name
}

output "backup_url" {
  description = "BACKUP_URL the services use."
  value       = local.common_env.BACKUP_URL
}

output "archive_url" {
  description = "ARCHIVE_URL the services use."
  value       = local.common_env.ARCHIVE_URL
}

output "secrets" {
  description = "Secret ids whose values to add (README: Deploy to Google Cloud)."
  value       = { for k, s in google_secret_manager_secret.config : k => s.secret_id }
}

output "service_accounts" {
  description = "Service accounts of serve, the worker and the push identity."
  value = {
    serve  = google_service_account.runtime["serve"].email
    worker = google_service_account.runtime["worker"].email
    push   = google_service_account.push.email
  }
}

output "connections_needed" {
  description = "The connection budget's total against database_max_connections."
  value       = local.connections_needed
}

output "migrate_job" {
  description = "Cloud Run job that runs the migrations: gcloud run jobs execute NAME --wait."
  value       = google_cloud_run_v2_job.migrate.name
}
