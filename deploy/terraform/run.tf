# `serve`: push deliveries (push mode) and the read API, scaled on requests.
module "serve" {
  source = "./service"

  name             = "${var.name}-serve"
  region           = var.region
  image            = var.image
  args             = ["serve"]
  service_account  = google_service_account.runtime["serve"].email
  ingress          = var.serve_ingress
  custom_audiences = [local.push_audience]
  min_instances    = var.serve_min_instances
  max_instances    = var.serve_max_instances
  always_allocated = false
  concurrency      = var.serve_concurrency
  timeout_s        = var.request_timeout_s
  env = merge(local.common_env, local.otel_env, {
    PUSH_AUTH             = "required"
    PUSH_AUDIENCE         = local.push_audience
    PUSH_SERVICE_ACCOUNTS = google_service_account.push.email
  })
  secret_env = local.secret_env
  platform   = local.platform

  depends_on = [google_secret_manager_secret_iam_member.runtime]
}

# The pull worker (`run`), pull mode only: CPU always allocated (it works between
# requests: it receives none), at least one instance, reachable by nobody; Cloud Run
# probes its /healthz on PORT (/readyz answers operators: dependencies up, pulling).
module "worker" {
  source = "./service"
  count  = local.push ? 0 : 1

  name             = "${var.name}-worker"
  region           = var.region
  image            = var.image
  args             = ["run"]
  service_account  = google_service_account.runtime["worker"].email
  ingress          = "INGRESS_TRAFFIC_INTERNAL_ONLY"
  min_instances    = var.worker_min_instances
  max_instances    = var.worker_max_instances
  always_allocated = true
  env              = merge(local.common_env, local.otel_env)
  secret_env       = local.secret_env
  platform         = local.platform

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
