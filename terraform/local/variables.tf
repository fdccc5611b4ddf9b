variable "state_dir" {
  description = "Where the PKI, secrets and generated files go (absolute path); empty: deploy/.state/local in the repository."
  type        = string
  default     = ""
}

variable "agents" {
  description = "How many agent containers (devices edge-1 .. edge-N, each with its own certificate)."
  type        = number
  default     = 2
  validation {
    condition     = var.agents >= 1 && var.agents <= 99 && floor(var.agents) == var.agents
    error_message = "agents must be a whole number from 1 to 99."
  }
}

variable "agent_platforms" {
  description = "The agents' architectures, given in turn to edge-1, edge-2, ...: amd64 (the host's), arm64, armv7 (ARM agents run under qemu-user-static's binfmt handlers)."
  type        = list(string)
  default     = ["amd64"]
  validation {
    condition     = length(var.agent_platforms) >= 1 && alltrue([for p in var.agent_platforms : contains(["amd64", "arm64", "armv7"], p)])
    error_message = "agent_platforms must list one or more of amd64, arm64, armv7."
  }
}

variable "https_port" {
  description = "Port on 127.0.0.1 of the fleet's API and dashboard (HTTPS)."
  type        = number
  default     = 8443
}

variable "mqtt_port" {
  description = "Port on 127.0.0.1 of the broker (MQTT over mutual TLS)."
  type        = number
  default     = 8883
}

variable "project" {
  description = "The compose project name: prefixes every container, network and volume."
  type        = string
  default     = "ember-local"
}

variable "wait_timeout_s" {
  description = "How long apply waits for the stack to become healthy."
  type        = number
  default     = 240
}
