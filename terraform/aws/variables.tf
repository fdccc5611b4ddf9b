variable "region" {
  description = "The AWS region everything is created in (scripts/up.sh aws checks that the CLI's region matches)."
  type        = string
  default     = "eu-west-1"
}

variable "name" {
  description = "Prefix of every resource name; one deployment per name and account."
  type        = string
  default     = "ember"
  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{1,20}$", var.name))
    error_message = "name: 2-21 characters, lower-case letters, digits and '-', starting with a letter (it becomes part of bucket names)."
  }
}

variable "devices" {
  description = <<-EOT
    The devices, thing name => certificate signing request (PEM) made on the device with
    `ember-agent csr --device-id <thing> --key <key>`. The private key never leaves the device
    and never enters the Terraform state; a CSR is public. Thing names follow the agent's
    aws-iot-core rule: 1-128 characters of A-Z a-z 0-9 - _ : (no '.', which Ember's device ids
    otherwise allow; ':' is refused too, as Ember's ids do not allow it).
  EOT
  type        = map(string)
  default     = {}
  validation {
    condition     = alltrue([for k in keys(var.devices) : can(regex("^[A-Za-z0-9_-]{1,64}$", k))])
    error_message = "devices: every key must be a valid thing name and Ember device id: 1-64 characters of A-Z a-z 0-9 - _."
  }
  validation {
    condition     = alltrue([for v in values(var.devices) : startswith(trimspace(v), "-----BEGIN CERTIFICATE REQUEST-----")])
    error_message = "devices: every value must be a PEM certificate signing request (ember-agent csr)."
  }
}

variable "fleet_csr" {
  description = "Optional CSR (PEM) for the fleet's own MQTT identity on IoT Core (desired state over MQTT); empty: the fleet publishes desired state through the IoT data-plane API with its IAM role."
  type        = string
  default     = ""
}

variable "vpc_cidr" {
  description = "The VPC's address range; split into one public and one private subnet per availability zone."
  type        = string
  default     = "10.40.0.0/16"
}

variable "az_count" {
  description = "Availability zones used (2 or 3)."
  type        = number
  default     = 2
  validation {
    condition     = var.az_count >= 2 && var.az_count <= 3
    error_message = "az_count: 2 or 3 (EKS and RDS subnet groups need at least two zones)."
  }
}

variable "kinesis_shards" {
  description = "Shards of the ingest stream: each takes 1 MB/s or 1,000 records/s in, 2 MB/s out (docs/deploy-aws.md sizes it)."
  type        = number
  default     = 2
}

variable "kinesis_retention_hours" {
  description = "How long Kinesis keeps records: the longest fleet outage that loses nothing."
  type        = number
  default     = 48
}

variable "db_instance_class" {
  description = "RDS instance class of the fleet's PostgreSQL."
  type        = string
  default     = "db.t4g.medium"
}

variable "db_allocated_gb" {
  description = "RDS storage (GB, gp3); autoscaling up to 4x."
  type        = number
  default     = 50
}

variable "db_multi_az" {
  description = "Run RDS with a standby in a second zone."
  type        = bool
  default     = true
}

variable "deletion_protection" {
  description = "Protect RDS from deletion (scripts/down.sh aws turns it off before destroying)."
  type        = bool
  default     = true
}

variable "eks_version" {
  description = "Kubernetes version of the EKS cluster."
  type        = string
  default     = "1.32"
}

variable "eks_public_access_cidrs" {
  description = "Networks allowed to reach the EKS API endpoint from the internet; empty: private endpoint only (kubectl from inside the VPC)."
  type        = list(string)
  default     = []
}

variable "node_instance_types" {
  description = "Instance types of the EKS managed node group."
  type        = list(string)
  default     = ["t3.large"]
}

variable "node_count" {
  description = "Desired nodes (min 2 for the fleet's two replicas on distinct hosts)."
  type        = number
  default     = 2
}

variable "k8s_namespace" {
  description = "Namespace of the fleet (deploy/k8s/overlays/aws)."
  type        = string
  default     = "ember"
}

variable "k8s_service_account" {
  description = "Service account of the fleet (deploy/k8s/base/serviceaccount.yaml): the only identity that may assume the fleet's IAM role."
  type        = string
  default     = "ember-fleet"
}

variable "datalake_ia_days" {
  description = "Days after which data-lake objects move to S3 Standard-IA."
  type        = number
  default     = 30
}

variable "datalake_glacier_days" {
  description = "Days after which data-lake objects move to Glacier Instant Retrieval."
  type        = number
  default     = 180
}

variable "tags" {
  description = "Tags on every resource."
  type        = map(string)
  default     = {}
}
