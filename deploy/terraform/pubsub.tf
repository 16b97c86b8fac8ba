resource "google_pubsub_topic" "topics" {
  #checkov:skip=CKV_GCP_83:Google-managed encryption; a CMEK key (kms_key_name) is the adopter's choice, with its own key ring and IAM
  for_each = toset(local.topology.topics)
  name     = each.value
}

resource "google_pubsub_subscription" "worker" {
  for_each             = local.worker_subscriptions
  name                 = each.key
  topic                = google_pubsub_topic.topics[each.value.topic].id
  ack_deadline_seconds = each.value.ack_deadline_seconds

  retry_policy {
    minimum_backoff = each.value.retry_policy.minimum_backoff
    maximum_backoff = each.value.retry_policy.maximum_backoff
  }
  dead_letter_policy {
    dead_letter_topic     = google_pubsub_topic.topics[each.value.dead_letter_policy.dead_letter_topic].id
    max_delivery_attempts = each.value.dead_letter_policy.max_delivery_attempts
  }
  expiration_policy {
    ttl = "" # never: an idle subscription must not vanish with its backlog
  }

  dynamic "push_config" {
    for_each = local.push ? [each.value.topic] : []
    content {
      push_endpoint = "${module.serve.uri}/push/${push_config.value}"
      oidc_token {
        service_account_email = google_service_account.push.email
        audience              = local.push_audience
      }
    }
  }
}

resource "google_pubsub_subscription" "dead_letter" {
  for_each                   = local.dead_letter_subscriptions
  name                       = each.key
  topic                      = google_pubsub_topic.topics[each.value.topic].id
  ack_deadline_seconds       = each.value.ack_deadline_seconds
  message_retention_duration = each.value.message_retention_duration
  expiration_policy {
    ttl = ""
  }
}

# Dead-lettering on a real project: Pub/Sub's service agent forwards what exhausted its
# attempts, so it must publish to each dead-letter topic and acknowledge on each source
# subscription. Without these nothing is ever forwarded, and delivery attempts are not
# even counted.
resource "google_pubsub_topic_iam_member" "agent_publishes_dead_letters" {
  for_each = local.dead_letter_topics
  topic    = google_pubsub_topic.topics[each.value].id
  role     = "roles/pubsub.publisher"
  member   = local.pubsub_sa
}

resource "google_pubsub_subscription_iam_member" "agent_acknowledges_sources" {
  for_each     = google_pubsub_subscription.worker
  subscription = each.value.id
  role         = "roles/pubsub.subscriber"
  member       = local.pubsub_sa
}

# The workers: publish their dead letters and invalidations; pull (pull mode) their
# own subscriptions. Nothing on any other topic or subscription.
resource "google_pubsub_topic_iam_member" "runtime_publishes" {
  for_each = {
    for pair in setproduct(tolist(local.published_topics), ["serve", "worker"]) :
    "${pair[0]}/${pair[1]}" => { topic = pair[0], account = pair[1] }
  }
  topic  = google_pubsub_topic.topics[each.value.topic].id
  role   = "roles/pubsub.publisher"
  member = google_service_account.runtime[each.value.account].member
}

resource "google_pubsub_subscription_iam_member" "worker_pulls" {
  for_each     = local.push ? {} : google_pubsub_subscription.worker
  subscription = each.value.id
  role         = "roles/pubsub.subscriber"
  member       = google_service_account.runtime["worker"].member
}

# Readiness asks Pub/Sub for the invalidation topic (GetTopic), which publishing alone
# does not allow.
resource "google_pubsub_topic_iam_member" "runtime_checks_readiness" {
  for_each = toset(["serve", "worker"])
  topic    = google_pubsub_topic.topics[var.invalidation_topic].id
  role     = "roles/pubsub.viewer"
  member   = google_service_account.runtime[each.value].member
}
