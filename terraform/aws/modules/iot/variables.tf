variable "name" {
  description = "Resource name prefix."
  type        = string
}

variable "devices" {
  description = "Thing name => CSR (PEM)."
  type        = map(string)
}

variable "fleet_csr" {
  description = "CSR (PEM) of the fleet's MQTT identity; empty for none."
  type        = string
}

variable "kms_key" {
  description = "KMS key ARN (Kinesis, logs)."
  type        = string
}

variable "shards" {
  description = "Kinesis shards."
  type        = number
}

variable "retention_hours" {
  description = "Kinesis retention (hours)."
  type        = number
}
