# `serve`: push deliveries (push mode) and the read API, scaled on requests.
resource "google_cloud_run_v2_service" "serve" {
  name                = "${var.name}-serve"
  location            = var.region
  ingress             = var.serve_ingress
  custom_audiences    = [local.push_audience]
  deletion_protection = false

  template {
    service_account                  = google_service_account.runtime["serve"].email
    max_instance_request_concurrency = var.serve_concurrency
    timeout                          = "${var.request_timeout_s}s"
    scaling {
      min_instance_count = var.serve_min_instances
      max_instance_count = var.serve_max_instances
    }

    dynamic "vpc_access" {
      for_each = var.vpc_network == "" ? [] : [1]
      content {
        egress = "PRIVATE_RANGES_ONLY"
        network_interfaces {
          network    = var.vpc_network
          subnetwork = var.vpc_subnetwork
        }
      }
    }
    volumes {
      name = "cloudsql"
      cloud_sql_instance {
        instances = [var.cloud_sql_instance]
      }
    }
    dynamic "volumes" {
      for_each = local.collector
      content {
        name = "otel-collector-config"
        secret {
          secret = google_secret_manager_secret.config["otel-collector-config"].secret_id
          items {
            version = google_secret_manager_secret_version.otel_collector_config.version
            path    = "config.yaml"
          }
        }
      }
    }
    dynamic "containers" {
      for_each = local.collector
      content {
        name  = "otel-collector"
        image = containers.value
        args  = ["--config=/etc/otelcol-google/config.yaml"]
        resources {
          limits = { cpu = "1", memory = "512Mi" }
        }
        volume_mounts {
          name       = "otel-collector-config"
          mount_path = "/etc/otelcol-google"
        }
        startup_probe {
          http_get {
            path = "/"
            port = 13133
          }
        }
      }
    }

    containers {
      name  = "worker"
      image = var.image
      args  = ["serve"]
      ports {
        container_port = 8080
      }
      resources {
        limits            = { cpu = var.cpu, memory = var.memory }
        cpu_idle          = true
        startup_cpu_boost = true
      }
      dynamic "env" {
        for_each = merge(local.common_env, local.otel_env, {
          PUSH_AUTH             = "required"
          PUSH_AUDIENCE         = local.push_audience
          PUSH_SERVICE_ACCOUNTS = google_service_account.push.email
        })
        content {
          name  = env.key
          value = env.value
        }
      }
      dynamic "env" {
        for_each = local.secret_env
        content {
          name = env.key
          value_source {
            secret_key_ref {
              secret  = env.value
              version = "latest"
            }
          }
        }
      }
      volume_mounts {
        name       = "cloudsql"
        mount_path = "/cloudsql"
      }
      startup_probe {
        period_seconds    = 2
        failure_threshold = 30
        http_get {
          path = "/readyz"
        }
      }
      liveness_probe {
        period_seconds = 10
        http_get {
          path = "/healthz"
        }
      }
    }
  }

  depends_on = [google_secret_manager_secret_iam_member.runtime]
}

# The pull worker (`run`), pull mode only: CPU always allocated (it works between
# requests: it receives none), at least one instance, reachable by nobody; Cloud Run
# probes its /healthz and /readyz on PORT.
resource "google_cloud_run_v2_service" "worker" {
  count               = local.push ? 0 : 1
  name                = "${var.name}-worker"
  location            = var.region
  ingress             = "INGRESS_TRAFFIC_INTERNAL_ONLY"
  deletion_protection = false

  template {
    service_account = google_service_account.runtime["worker"].email
    scaling {
      min_instance_count = var.worker_min_instances
      max_instance_count = var.worker_max_instances
    }

    dynamic "vpc_access" {
      for_each = var.vpc_network == "" ? [] : [1]
      content {
        egress = "PRIVATE_RANGES_ONLY"
        network_interfaces {
          network    = var.vpc_network
          subnetwork = var.vpc_subnetwork
        }
      }
    }
    volumes {
      name = "cloudsql"
      cloud_sql_instance {
        instances = [var.cloud_sql_instance]
      }
    }
    dynamic "volumes" {
      for_each = local.collector
      content {
        name = "otel-collector-config"
        secret {
          secret = google_secret_manager_secret.config["otel-collector-config"].secret_id
          items {
            version = google_secret_manager_secret_version.otel_collector_config.version
            path    = "config.yaml"
          }
        }
      }
    }
    dynamic "containers" {
      for_each = local.collector
      content {
        name  = "otel-collector"
        image = containers.value
        args  = ["--config=/etc/otelcol-google/config.yaml"]
        resources {
          limits = { cpu = "1", memory = "512Mi" }
        }
        volume_mounts {
          name       = "otel-collector-config"
          mount_path = "/etc/otelcol-google"
        }
        startup_probe {
          http_get {
            path = "/"
            port = 13133
          }
        }
      }
    }

    containers {
      name  = "worker"
      image = var.image
      args  = ["run"]
      ports {
        container_port = 8080
      }
      resources {
        limits            = { cpu = var.cpu, memory = var.memory }
        cpu_idle          = false
        startup_cpu_boost = true
      }
      dynamic "env" {
        for_each = merge(local.common_env, local.otel_env)
        content {
          name  = env.key
          value = env.value
        }
      }
      dynamic "env" {
        for_each = local.secret_env
        content {
          name = env.key
          value_source {
            secret_key_ref {
              secret  = env.value
              version = "latest"
            }
          }
        }
      }
      volume_mounts {
        name       = "cloudsql"
        mount_path = "/cloudsql"
      }
      startup_probe {
        period_seconds    = 2
        failure_threshold = 30
        http_get {
          path = "/readyz"
        }
      }
      liveness_probe {
        period_seconds = 10
        http_get {
          path = "/healthz"
        }
      }
    }
  }

  depends_on = [google_secret_manager_secret_iam_member.runtime]
}

# Migrations (`utxoiq-worker migrate`), run by the operator before the services start
# and after each upgrade: `gcloud run jobs execute <name>-migrate --wait`.
resource "google_cloud_run_v2_job" "migrate" {
  name                = "${var.name}-migrate"
  location            = var.region
  deletion_protection = false

  template {
    task_count = 1
    template {
      service_account = google_service_account.runtime["worker"].email
      max_retries     = 0
      timeout         = "900s"
      volumes {
        name = "cloudsql"
        cloud_sql_instance {
          instances = [var.cloud_sql_instance]
        }
      }
      containers {
        image = var.image
        args  = ["migrate"]
        env {
          name = "DATABASE_URL"
          value_source {
            secret_key_ref {
              secret  = local.secret_env.DATABASE_URL
              version = "latest"
            }
          }
        }
        volume_mounts {
          name       = "cloudsql"
          mount_path = "/cloudsql"
        }
      }
    }
  }

  depends_on = [google_secret_manager_secret_iam_member.runtime]
}
