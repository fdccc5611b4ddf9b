variable "bucket" {
  description = "The bucket's (globally unique) name."
  type        = string
}

variable "kms_key" {
  description = "KMS key ARN for SSE-KMS."
  type        = string
}

variable "ia_days" {
  description = "Days after which objects move to Standard-IA; null: never."
  type        = number
  default     = null
}

variable "glacier_days" {
  description = "Days after which objects move to Glacier Instant Retrieval; null: never."
  type        = number
  default     = null
}

variable "noncurrent_days" {
  description = "Days an overwritten or deleted object's old version is kept."
  type        = number
  default     = 90
}
