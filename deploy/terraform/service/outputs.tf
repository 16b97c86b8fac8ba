output "name" {
  description = "The service's name."
  value       = google_cloud_run_v2_service.this.name
}

output "location" {
  description = "The service's region."
  value       = google_cloud_run_v2_service.this.location
}

output "uri" {
  description = "The service's URL."
  value       = google_cloud_run_v2_service.this.uri
}
