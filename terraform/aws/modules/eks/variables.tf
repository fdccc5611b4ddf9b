variable "name" {
  description = "Resource name prefix and cluster name."
  type        = string
}

variable "kubernetes_version" {
  description = "Kubernetes version."
  type        = string
}

variable "vpc_id" {
  description = "The VPC."
  type        = string
}

variable "subnet_ids" {
  description = "Private subnets for the control plane's interfaces and the nodes."
  type        = list(string)
}

variable "public_access_cidrs" {
  description = "Networks allowed to the public API endpoint; empty: private endpoint only."
  type        = list(string)
}

variable "kms_key" {
  description = "KMS key ARN (secrets, logs; the fleet decrypts with it)."
  type        = string
}

variable "node_instance_types" {
  description = "Node instance types."
  type        = list(string)
}

variable "node_count" {
  description = "Desired nodes."
  type        = number
}

variable "namespace" {
  description = "The fleet's namespace."
  type        = string
}

variable "service_account" {
  description = "The fleet's service account."
  type        = string
}

variable "kinesis_stream_arn" {
  description = "The ingest stream the fleet reads."
  type        = string
}

variable "bucket_arns" {
  description = "The buckets the fleet reads and writes."
  type        = list(string)
}

variable "desired_topic_arn" {
  description = "Topic ARN pattern the fleet publishes desired state to."
  type        = string
}

variable "db_secret_arn" {
  description = "The database master secret the fleet reads."
  type        = string
}
