variable "name" {
  description = "Resource name prefix."
  type        = string
}

variable "cidr" {
  description = "The VPC's address range."
  type        = string
}

variable "az_count" {
  description = "Availability zones used."
  type        = number
}

variable "kms_key" {
  description = "KMS key ARN for the flow logs."
  type        = string
}
