variable "name" {
  description = "Resource name prefix."
  type        = string
}

variable "vpc_id" {
  description = "The VPC."
  type        = string
}

variable "subnet_ids" {
  description = "Private subnets for the subnet group."
  type        = list(string)
}

variable "client_security_group" {
  description = "The only security group allowed to connect (the EKS nodes')."
  type        = string
}

variable "kms_key" {
  description = "KMS key ARN (storage, secret, Performance Insights)."
  type        = string
}

variable "instance_class" {
  description = "Instance class."
  type        = string
}

variable "allocated_gb" {
  description = "Storage in GB."
  type        = number
}

variable "multi_az" {
  description = "Standby in a second zone."
  type        = bool
}

variable "deletion_protection" {
  description = "Deletion protection."
  type        = bool
}
