# One Cloud Run service running the worker's image: `serve` or the pull worker `run`,
# with the Cloud SQL socket, optional Direct VPC egress (Memorystore), secrets as
# environment variables, probes on PORT, and optionally an OpenTelemetry Collector
# beside it.
terraform {
  required_providers {
    google = {
      source = "hashicorp/google"
    }
  }
}

locals {
  collector = var.platform.collector_image == "" ? [] : [var.platform.collector_image]
}

resource "google_cloud_run_v2_service" "this" {
  name                = var.name
  location            = var.region
  ingress             = var.ingress
  custom_audiences    = var.custom_audiences
  deletion_protection = false

  template {
    service_account                  = var.service_account
    max_instance_request_concurrency = var.concurrency
    timeout                          = "${var.timeout_s}s"
    scaling {
      min_instance_count = var.min_instances
      max_instance_count = var.max_instances
    }

    dynamic "vpc_access" {
      for_each = var.platform.vpc_network == "" ? [] : [1]
      content {
        egress = "PRIVATE_RANGES_ONLY"
        network_interfaces {
          network    = var.platform.vpc_network
          subnetwork = var.platform.vpc_subnetwork
        }
      }
    }
    volumes {
      name = "cloudsql"
      cloud_sql_instance {
        instances = [var.platform.cloud_sql_instance]
      }
    }
    dynamic "volumes" {
      for_each = local.collector
      content {
        name = "otel-collector-config"
        secret {
          secret = var.platform.collector_config_secret
          items {
            version = var.platform.collector_config_version
            path    = "config.yaml"
          }
        }
      }
    }

    containers {
      name  = "worker"
      image = var.image
      args  = var.args
      ports {
        container_port = 8080
      }
      resources {
        limits            = { cpu = var.platform.cpu, memory = var.platform.memory }
        cpu_idle          = !var.always_allocated
        startup_cpu_boost = true
      }
      dynamic "env" {
        for_each = var.env
        content {
          name  = env.key
          value = env.value
        }
      }
      dynamic "env" {
        for_each = var.secret_env
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
      # Started once it answers, then alive for as long as its loops run
      # (worker/http/health.py). Not /readyz: it fails while Redis is down, and the
      # worker is built to go on without Redis; an instance must still start then.
      startup_probe {
        period_seconds    = 2
        failure_threshold = 30
        http_get {
          path = "/healthz"
        }
      }
      liveness_probe {
        period_seconds = 10
        http_get {
          path = "/healthz"
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
  }
}
