# Alerts, each with what it means and what to do (README: Operations, alerts).
locals {
  service_names = compact([module.serve.name, local.push ? "" : "${var.name}-worker"])
  service_logs  = "resource.type=\"cloud_run_revision\" AND resource.labels.service_name=(${join(" OR ", [for s in local.service_names : "\"${s}\""])})"
  quoted_subscriptions = {
    worker      = join(", ", [for s in keys(local.worker_subscriptions) : "\"${s}\""])
    dead_letter = join(", ", [for s in keys(local.dead_letter_subscriptions) : "\"${s}\""])
  }
  # Log-based metric names are PromQL names too: underscores only.
  metric_prefix = replace(var.name, "-", "_")
}

resource "google_monitoring_alert_policy" "dead_letters_waiting" {
  display_name          = "${var.name}: dead letters waiting"
  combiner              = "OR"
  notification_channels = var.notification_channels
  conditions {
    display_name = "a dead-letter subscription is not empty"
    condition_threshold {
      filter          = "metric.type=\"pubsub.googleapis.com/subscription/num_undelivered_messages\" AND resource.type=\"pubsub_subscription\" AND resource.label.subscription_id=one_of(${local.quoted_subscriptions.dead_letter})"
      comparison      = "COMPARISON_GT"
      threshold_value = 0
      duration        = "0s"
      aggregations {
        alignment_period   = "300s"
        per_series_aligner = "ALIGN_MAX"
      }
    }
  }
  documentation {
    mime_type = "text/markdown"
    content   = "Messages were dead-lettered: `utxoiq-worker dlq stats`, then the runbook in README (Dead letters: find, understand, fix, replay). Pub/Sub drops them after 7 days."
  }
}

resource "google_monitoring_alert_policy" "backlog_age" {
  display_name          = "${var.name}: worker subscription backlog is old"
  combiner              = "OR"
  notification_channels = var.notification_channels
  conditions {
    display_name = "oldest unacknowledged message older than ${var.oldest_unacked_alert_s} s"
    condition_threshold {
      filter          = "metric.type=\"pubsub.googleapis.com/subscription/oldest_unacked_message_age\" AND resource.type=\"pubsub_subscription\" AND resource.label.subscription_id=one_of(${local.quoted_subscriptions.worker})"
      comparison      = "COMPARISON_GT"
      threshold_value = var.oldest_unacked_alert_s
      duration        = "300s"
      aggregations {
        alignment_period   = "60s"
        per_series_aligner = "ALIGN_MAX"
      }
    }
  }
  documentation {
    mime_type = "text/markdown"
    content   = "The worker is not keeping up or not running: check the services' instances and errors, PostgreSQL (connections, locks), then raise max instances within the connection budget (README)."
  }
}

resource "google_logging_metric" "backup_succeeded" {
  name        = "${local.metric_prefix}_backup_succeeded"
  description = "Backup runs that succeeded (the worker's log line)."
  filter      = "${local.service_logs} AND jsonPayload.message=\"maintenance run succeeded\" AND jsonPayload.run=~\"^backup of \""
  metric_descriptor {
    metric_kind = "DELTA"
    value_type  = "INT64"
  }
}

resource "google_monitoring_alert_policy" "no_recent_backup" {
  display_name          = "${var.name}: no successful backup in 26 h"
  combiner              = "OR"
  notification_channels = var.notification_channels
  conditions {
    display_name = "no backup succeeded in 26 h"
    # A metric-absence condition stops at 23.5 h: PromQL looks back the full 26 h.
    condition_prometheus_query_language {
      query               = "absent_over_time(logging_googleapis_com:user_${google_logging_metric.backup_succeeded.name}[26h])"
      duration            = "0s"
      evaluation_interval = "300s"
    }
  }
  documentation {
    mime_type = "text/markdown"
    content   = "The daily backup did not succeed: `utxoiq-worker backup list`, the worker's logs for `maintenance run failed`, the Scheduler job `${var.name}-backup`. Run one by hand: `utxoiq-worker backup run`."
  }
}

resource "google_monitoring_alert_policy" "retention_failed" {
  display_name          = "${var.name}: retention run failed"
  combiner              = "OR"
  notification_channels = var.notification_channels
  conditions {
    display_name = "a retention run failed"
    condition_matched_log {
      filter = "${local.service_logs} AND jsonPayload.message=\"maintenance run failed\" AND jsonPayload.run=~\"^retention of \""
    }
  }
  alert_strategy {
    notification_rate_limit {
      period = "3600s"
    }
    auto_close = "86400s"
  }
  documentation {
    mime_type = "text/markdown"
    content   = "A retention run failed (its error is in the log entry). Nothing is lost: rows are deleted only after their archive is verified, and the next delivery or `utxoiq-worker retention run` resumes. Fix the cause (storage permissions, a lock timeout), then rerun."
  }
}

resource "google_logging_metric" "errors" {
  name        = "${local.metric_prefix}_error_logs"
  description = "ERROR (and worse) log entries of the worker's services."
  filter      = "${local.service_logs} AND severity>=ERROR"
  metric_descriptor {
    metric_kind = "DELTA"
    value_type  = "INT64"
  }
}

resource "google_monitoring_alert_policy" "error_logs" {
  display_name          = "${var.name}: error logs"
  combiner              = "OR"
  notification_channels = var.notification_channels
  conditions {
    display_name = "more than ${var.error_logs_per_minute_alert} errors a minute for 5 minutes"
    condition_threshold {
      filter          = "metric.type=\"logging.googleapis.com/user/${google_logging_metric.errors.name}\" AND resource.type=\"cloud_run_revision\""
      comparison      = "COMPARISON_GT"
      threshold_value = var.error_logs_per_minute_alert
      duration        = "300s"
      aggregations {
        alignment_period     = "60s"
        per_series_aligner   = "ALIGN_SUM"
        cross_series_reducer = "REDUCE_SUM"
      }
    }
  }
  documentation {
    mime_type = "text/markdown"
    content   = "The services log errors: read them in Cloud Logging (the `message` and `error` fields), most often the database or Redis unreachable; transient faults are retried and lose nothing."
  }
}
