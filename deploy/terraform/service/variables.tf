variable "name" {
  description = "Cloud Run service name."
  type        = string
}

variable "region" {
  description = "Region of the service."
  type        = string
}

variable "image" {
  description = "The worker's image."
  type        = string
}

variable "args" {
  description = "The worker's command line: [\"serve\"] or [\"run\"]."
  type        = list(string)
}

variable "service_account" {
  description = "Email of the identity the service runs as."
  type        = string
}

variable "ingress" {
  description = "Cloud Run ingress setting."
  type        = string
}

variable "custom_audiences" {
  description = "Audiences, besides the service's URL, that Cloud Run accepts in tokens."
  type        = list(string)
  default     = []
}

variable "min_instances" {
  description = "Least instances."
  type        = number
}

variable "max_instances" {
  description = "Most instances."
  type        = number
}

variable "always_allocated" {
  description = "CPU allocated between requests too (a pull worker receives none)."
  type        = bool
}

variable "concurrency" {
  description = "Requests at once per instance (0: Cloud Run's default)."
  type        = number
  default     = 0
}

variable "timeout_s" {
  description = "Request timeout in seconds."
  type        = number
  default     = 300
}

variable "env" {
  description = "Environment variables: name -> value."
  type        = map(string)
}

variable "secret_env" {
  description = "Environment variables from Secret Manager: name -> secret id (latest version)."
  type        = map(string)
}

variable "platform" {
  description = "What the service runs on: cpu and memory per instance, the Cloud SQL connection name (mounted at /cloudsql), the VPC network and subnetwork for Direct VPC egress (empty: none), the OpenTelemetry Collector image run beside it (empty: none) and the secret and version of its configuration."
  type = object({
    cpu                      = string
    memory                   = string
    cloud_sql_instance       = string
    vpc_network              = string
    vpc_subnetwork           = string
    collector_image          = string
    collector_config_secret  = string
    collector_config_version = string
  })
}
