# The Pub/Sub topology comes from the topic registry, never from a second list here:
# `utxoiq-worker topology render > deploy/pubsub-topology.json` writes it, and a test
# keeps the file equal to the registry.
locals {
  topology = jsondecode(file("${path.module}/../pubsub-topology.json"))

  # A worker subscription is one with a dead-letter policy; the others are the
  # dead-letter subscriptions operators read (`utxoiq-worker dlq`).
  worker_subscriptions = {
    for s in local.topology.subscriptions : s.name => s if lookup(s, "dead_letter_policy", null) != null
  }
  dead_letter_subscriptions = {
    for s in local.topology.subscriptions : s.name => s if lookup(s, "dead_letter_policy", null) == null
  }
  dead_letter_topics = toset([for s in local.worker_subscriptions : s.dead_letter_policy.dead_letter_topic])
  # Topics the worker itself publishes to: dead letters and cache invalidations.
  published_topics = setunion(local.dead_letter_topics, toset([var.invalidation_topic]))

  push      = var.delivery == "push"
  pubsub_sa = "serviceAccount:service-${data.google_project.this.number}@gcp-sa-pubsub.iam.gserviceaccount.com"
  # Push requests carry an OIDC token for this audience; `serve` checks it
  # (PUSH_AUDIENCE) and Cloud Run accepts it as one of the service's custom audiences.
  push_audience = "${var.name}-push"

  # Scheduler bodies: CONTRACT.md's maintenance payloads.
  maintenance_tasks = {
    backup    = { schedule = var.backup_schedule, body = { task = "backup" } }
    retention = { schedule = var.retention_schedule, body = { task = "retention" } }
  }

  # Processes per instance of either service (WORKER_PROCESSES): one per vCPU unless set.
  processes = var.processes_per_instance > 0 ? var.processes_per_instance : ceil(tonumber(var.cpu))
  # Connection budget (README): every process's pool full in every instance, plus one
  # maintenance run (runs are once a day and exclusive), plus PostgreSQL's reserved
  # slots and the operators' margin (migrations, the CLI).
  pool_per_instance = (var.database_pool_size + var.database_max_overflow) * local.processes
  connections_needed = (
    var.serve_max_instances * local.pool_per_instance
    + (local.push ? 0 : var.worker_max_instances * local.pool_per_instance)
    + var.retention_streams + 2
    + var.database_reserved_connections
    + var.operator_connections
  )

  common_env = {
    GOOGLE_CLOUD_PROJECT    = var.project_id
    DATABASE_POOL_SIZE      = tostring(var.database_pool_size)
    DATABASE_MAX_OVERFLOW   = tostring(var.database_max_overflow)
    WORKER_PROCESSES        = tostring(local.processes)
    BACKUP_URL              = "gs://${google_storage_bucket.backups.name}"
    ARCHIVE_URL             = "gs://${google_storage_bucket.archives.name}"
    BACKUP_RETENTION_DAYS   = tostring(var.backup_retention_days)
    METRICS_RETENTION_DAYS  = tostring(var.metrics_retention_days)
    FEEDBACK_RETENTION_DAYS = tostring(var.feedback_retention_days)
    BACKFILL_RETENTION_DAYS = tostring(var.backfill_retention_days)
    RETENTION_STREAMS       = tostring(var.retention_streams)
    LOG_LEVEL               = var.log_level
  }
  # Telemetry goes over OTLP to a collector beside the container (deploy/otel-collector.yaml).
  otel_env = var.otel_collector_image == "" ? {} : {
    OTEL_EXPORTER_OTLP_ENDPOINT = "http://localhost:4317"
    OTEL_SERVICE_NAME           = var.name
  }
  # What both services run on: their size, the database socket, the network, telemetry.
  platform = {
    cpu                      = var.cpu
    memory                   = var.memory
    cloud_sql_instance       = var.cloud_sql_instance
    vpc_network              = var.vpc_network
    vpc_subnetwork           = var.vpc_subnetwork
    collector_image          = var.otel_collector_image
    collector_config_secret  = google_secret_manager_secret.config["otel-collector-config"].secret_id
    collector_config_version = google_secret_manager_secret_version.otel_collector_config.version
  }
  secret_env = {
    DATABASE_URL = google_secret_manager_secret.config["database-url"].secret_id
    REDIS_URL    = google_secret_manager_secret.config["redis-url"].secret_id
  }
}

check "connection_budget" {
  assert {
    condition     = local.connections_needed <= var.database_max_connections
    error_message = "max instances x processes x (pool + overflow) of every service, plus maintenance and reserved connections, exceed database_max_connections."
  }
}
