variable "project_id" {
  description = "Google Cloud project that holds everything below."
  type        = string
}

variable "region" {
  description = "Region of the Cloud Run services and the Scheduler jobs."
  type        = string
  default     = "europe-west1"
}

variable "name" {
  description = "Prefix of every resource name (services, service accounts, buckets, secrets)."
  type        = string
  default     = "utxoiq"
}

variable "image" {
  description = "Container image of the worker (README: Deploy to Google Cloud, step 2)."
  type        = string
}

variable "delivery" {
  description = "How the worker subscriptions deliver: \"pull\" (the `run` service pulls) or \"push\" (Pub/Sub pushes to `serve`)."
  type        = string
  default     = "pull"
  validation {
    condition     = contains(["pull", "push"], var.delivery)
    error_message = "delivery is \"pull\" or \"push\"."
  }
}

variable "invalidation_topic" {
  description = "The cache-invalidation topic of the topology (the worker publishes to it)."
  type        = string
  default     = "cache-invalidation"
}

variable "cloud_sql_instance" {
  description = "Connection name (PROJECT:REGION:INSTANCE) of the Cloud SQL for PostgreSQL 15 instance; DATABASE_URL points at /cloudsql/<this>."
  type        = string
}

variable "vpc_network" {
  description = "VPC network for Direct VPC egress to Memorystore (Redis); empty for none."
  type        = string
  default     = ""
}

variable "vpc_subnetwork" {
  description = "Subnetwork of vpc_network for Direct VPC egress."
  type        = string
  default     = ""
}

variable "serve_min_instances" {
  description = "Least instances of `serve` (push and the read API)."
  type        = number
  default     = 0
}

variable "serve_max_instances" {
  description = "Most instances of `serve` (connection budget)."
  type        = number
  default     = 4
}

variable "serve_concurrency" {
  description = "Requests at once per `serve` instance: pushes wait for their batch's commit, so many in flight coalesce into one transaction."
  type        = number
  default     = 200
}

variable "worker_min_instances" {
  description = "Least instances of the pull worker (`run`, CPU always allocated); pull mode only."
  type        = number
  default     = 1
}

variable "worker_max_instances" {
  description = "Most instances of the pull worker (connection budget); pull mode only."
  type        = number
  default     = 2
}

variable "cpu" {
  description = "vCPUs per instance of either service (a whole number: each runs a process per vCPU)."
  type        = string
  default     = "2"

  validation {
    condition     = can(tonumber(var.cpu)) && tonumber(var.cpu) >= 1
    error_message = "cpu must be a whole number of vCPUs, such as \"1\", \"2\" or \"4\"."
  }
}

variable "processes_per_instance" {
  description = "Processes of `serve` and `run` per instance, sharing its port (WORKER_PROCESSES); 0: one per vCPU."
  type        = number
  default     = 0
}

variable "memory" {
  description = "Memory per instance of either service."
  type        = string
  default     = "1Gi"
}

variable "request_timeout_s" {
  description = "Cloud Run request timeout of `serve`: a pushed maintenance request is held until its run ends (README: maintenance by push)."
  type        = number
  default     = 3600
}

variable "database_pool_size" {
  description = "DATABASE_POOL_SIZE of every process (an instance runs one per vCPU)."
  type        = number
  default     = 3
}

variable "database_max_overflow" {
  description = "DATABASE_MAX_OVERFLOW of every process."
  type        = number
  default     = 2
}

variable "database_max_connections" {
  description = "The database's max_connections (Cloud SQL sets it from the tier, or the flag)."
  type        = number
  default     = 100
}

variable "database_reserved_connections" {
  description = "Connections PostgreSQL keeps for superusers (superuser_reserved_connections) and Cloud SQL's own agents."
  type        = number
  default     = 6
}

variable "operator_connections" {
  description = "Connections left for operators: migrations, the CLI, a psql session."
  type        = number
  default     = 4
}

variable "retention_streams" {
  description = "RETENTION_STREAMS: metrics months archived at once (each its own connection)."
  type        = number
  default     = 3
}

variable "backup_schedule" {
  description = "Cron schedule (UTC) of the daily backup request."
  type        = string
  default     = "0 3 * * *"
}

variable "retention_schedule" {
  description = "Cron schedule (UTC) of the daily retention request."
  type        = string
  default     = "30 4 * * *"
}

variable "backup_retention_days" {
  description = "BACKUP_RETENTION_DAYS: the worker prunes backups older than this."
  type        = number
  default     = 7
}

variable "backup_deletion_margin_days" {
  description = "The bucket deletes backup objects this many days after the worker would have: a safety net, never the rule."
  type        = number
  default     = 3
}

variable "metrics_retention_days" {
  description = "METRICS_RETENTION_DAYS."
  type        = number
  default     = 90
}

variable "feedback_retention_days" {
  description = "FEEDBACK_RETENTION_DAYS."
  type        = number
  default     = 730
}

variable "backfill_retention_days" {
  description = "BACKFILL_RETENTION_DAYS."
  type        = number
  default     = 180
}

variable "archive_coldline_after_days" {
  description = "Archive objects move to COLDLINE this many days after they are written."
  type        = number
  default     = 30
}

variable "archive_archive_after_days" {
  description = "Archive objects move to ARCHIVE this many days after they are written."
  type        = number
  default     = 365
}

variable "bucket_location" {
  description = "Location of the backup and archive buckets."
  type        = string
  default     = "EU"
}

variable "log_bucket" {
  description = "An existing bucket that receives the access logs of the backup and archive buckets; empty for none."
  type        = string
  default     = ""
}

variable "otel_collector_image" {
  description = "Image of the OpenTelemetry Collector run beside each service (README: Telemetry), e.g. Google's us-docker.pkg.dev/cloud-ops-agents-artifacts/google-cloud-opentelemetry-collector/otelcol-google:VERSION; empty runs none and exports nothing."
  type        = string
  default     = ""
}

variable "log_level" {
  description = "LOG_LEVEL of both services."
  type        = string
  default     = "INFO"
}

variable "notification_channels" {
  description = "Cloud Monitoring notification channel ids the alerts go to."
  type        = list(string)
  default     = []
}

variable "oldest_unacked_alert_s" {
  description = "Alert when a worker subscription's oldest unacknowledged message is older than this."
  type        = number
  default     = 600
}

variable "error_logs_per_minute_alert" {
  description = "Alert when the services log more ERROR entries than this per minute, over 5 minutes."
  type        = number
  default     = 5
}

variable "read_api_invokers" {
  description = "Members (\"serviceAccount:...\") allowed to call the read API of `serve`."
  type        = list(string)
  default     = []
}

variable "serve_ingress" {
  description = "Ingress of `serve`: Pub/Sub push and the read API's callers must reach it."
  type        = string
  default     = "INGRESS_TRAFFIC_ALL"
}
