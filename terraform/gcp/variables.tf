variable "project_id" {
  description = "The Google Cloud project everything is created in (its ID, not its number or name)."
  type        = string
  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{4,28}[a-z0-9]$", var.project_id))
    error_message = "project_id must be a project ID: 6-30 characters, lowercase letters, digits and hyphens, starting with a letter."
  }
}

variable "region" {
  description = "The region of the cluster, the database, the buckets, the broker's address and Pub/Sub's message storage."
  type        = string
  default     = "europe-west1"
  validation {
    condition     = can(regex("^[a-z]+-[a-z]+[0-9]$", var.region))
    error_message = "region must be a Google Cloud region such as europe-west1 or us-central1."
  }
}

variable "name" {
  description = "Prefix of every resource name (cluster, service accounts, topics, buckets with the project ID appended)."
  type        = string
  default     = "ember"
  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{1,12}$", var.name))
    error_message = "name must be 2-13 characters: lowercase letters, digits and hyphens, starting with a letter (service account IDs are at most 30 characters)."
  }
}

variable "namespace" {
  description = "The Kubernetes namespace of deploy/k8s/overlays/gcp (Workload Identity binds its service accounts by namespace)."
  type        = string
  default     = "ember"
}

variable "master_authorized_cidrs" {
  description = "CIDR blocks allowed to reach the cluster's control plane (where you run kubectl / scripts/up.sh). The nodes have no public address either way."
  type        = list(string)
  validation {
    condition     = length(var.master_authorized_cidrs) > 0 && alltrue([for c in var.master_authorized_cidrs : can(cidrhost(c, 0)) && c != "0.0.0.0/0"])
    error_message = "master_authorized_cidrs must list at least one valid CIDR block, and not 0.0.0.0/0 (e.g. your public address with /32)."
  }
}

variable "device_source_cidrs" {
  description = "CIDR blocks devices connect to the broker from (its TCP load balancer). Devices authenticate with mutual TLS either way; narrow this when they sit behind known NAT addresses."
  type        = list(string)
  default     = ["0.0.0.0/0"]
  validation {
    condition     = length(var.device_source_cidrs) > 0 && alltrue([for c in var.device_source_cidrs : can(cidrhost(c, 0))])
    error_message = "device_source_cidrs must list at least one valid CIDR block."
  }
}

variable "broker_dns_name" {
  description = "An optional DNS name devices use for the broker (you create its A record pointing at the broker_ip output); empty: devices use the IP address. Either goes into the broker certificate's SANs."
  type        = string
  default     = ""
}

variable "node_machine_type" {
  description = "Machine type of the cluster's node pool (one node per zone at the minimum)."
  type        = string
  default     = "e2-standard-2"
}

variable "node_count_max" {
  description = "The node pool's autoscaling maximum per zone."
  type        = number
  default     = 3
  validation {
    condition     = var.node_count_max >= 1 && var.node_count_max <= 50 && floor(var.node_count_max) == var.node_count_max
    error_message = "node_count_max must be a whole number from 1 to 50."
  }
}

variable "db_tier" {
  description = "Cloud SQL machine tier (db-custom-<vCPU>-<MiB>, or a shared-core tier for trials)."
  type        = string
  default     = "db-custom-2-7680"
}

variable "db_high_availability" {
  description = "Cloud SQL regional (a standby in a second zone, automatic failover) instead of zonal."
  type        = bool
  default     = true
}

variable "deletion_protection" {
  description = "Protects the database and the cluster from deletion (terraform destroy fails while it is true). scripts/down.sh sets it to false first, on purpose."
  type        = bool
  default     = true
}

variable "pubsub_retention" {
  description = "How long the ingest subscription keeps unacknowledged messages (a fleet outage up to this long loses nothing), as seconds with an 's' suffix, 10 minutes to 7 days."
  type        = string
  default     = "604800s"
  validation {
    condition     = can(regex("^[0-9]+s$", var.pubsub_retention)) && try(tonumber(trimsuffix(var.pubsub_retention, "s")) >= 600 && tonumber(trimsuffix(var.pubsub_retention, "s")) <= 604800, false)
    error_message = "pubsub_retention must be between 600s and 604800s (Pub/Sub's limits for a subscription)."
  }
}

variable "max_delivery_attempts" {
  description = "Deliveries of a message the fleet cannot process (nack or ack deadline passed) before Pub/Sub moves it to the dead-letter topic."
  type        = number
  default     = 5
  validation {
    condition     = var.max_delivery_attempts >= 5 && var.max_delivery_attempts <= 100
    error_message = "max_delivery_attempts must be 5 to 100 (Pub/Sub's limits)."
  }
}

variable "ack_deadline_seconds" {
  description = "The fleet's ack deadline: a batch must be committed to PostgreSQL within it (the client library extends it while it works)."
  type        = number
  default     = 60
  validation {
    condition     = var.ack_deadline_seconds >= 10 && var.ack_deadline_seconds <= 600
    error_message = "ack_deadline_seconds must be 10 to 600."
  }
}

variable "lake_archive_after_days" {
  description = "Data-lake objects move to the Archive storage class after this many days."
  type        = number
  default     = 90
}

variable "noncurrent_versions_kept_days" {
  description = "Overwritten or deleted object versions (both buckets) are kept this many days, then deleted."
  type        = number
  default     = 30
}

variable "bigquery_table_expiration_days" {
  description = "Partitions of the analytics tables older than this are deleted; 0 keeps them forever."
  type        = number
  default     = 400
}

variable "kms_key_name" {
  description = "Optional CMEK: a Cloud KMS key (projects/P/locations/L/keyRings/R/cryptoKeys/K, same region) for the buckets, the Pub/Sub topics, the BigQuery dataset and Cloud SQL; empty: Google-managed keys. Grant the services' agents roles/cloudkms.cryptoKeyEncrypterDecrypter on it first."
  type        = string
  default     = ""
  validation {
    condition     = var.kms_key_name == "" || can(regex("^projects/[^/]+/locations/[^/]+/keyRings/[^/]+/cryptoKeys/[^/]+$", var.kms_key_name))
    error_message = "kms_key_name must be empty or a full key name projects/P/locations/L/keyRings/R/cryptoKeys/K."
  }
}

variable "gke_security_group" {
  description = "Optional Google Group for Kubernetes RBAC (gke-security-groups@yourdomain); empty: RBAC on individual identities only."
  type        = string
  default     = ""
}

variable "state_dir" {
  description = "Where the agent profile and the generated kustomization are written (absolute path); empty: deploy/.state/gcp in the repository. scripts/up.sh keeps the PKI there too."
  type        = string
  default     = ""
}

variable "bridge_replicas" {
  description = "Replicas of ember-bridge (`ember-fleet bridge`: MQTT to Pub/Sub, which the fleet reads). At least 1, or no device message reaches the fleet."
  type        = number
  default     = 2
  validation {
    condition     = var.bridge_replicas >= 0 && var.bridge_replicas <= 16 && floor(var.bridge_replicas) == var.bridge_replicas
    error_message = "bridge_replicas must be a whole number from 0 to 16."
  }
}
