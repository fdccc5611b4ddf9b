variable "subscription_id" {
  description = "The Azure subscription everything is created in (scripts/up.sh passes `az account show --query id`)."
  type        = string
  validation {
    condition     = can(regex("^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$", var.subscription_id))
    error_message = "subscription_id must be a subscription GUID (az account show --query id -o tsv)."
  }
}

variable "location" {
  description = "The Azure region (e.g. westeurope, eastus2). IoT Hub, DPS, AKS and PostgreSQL Flexible Server must all be offered there."
  type        = string
  default     = "westeurope"
  validation {
    condition     = can(regex("^[a-z]+[a-z0-9]*$", var.location))
    error_message = "location must be an Azure region name in lowercase without spaces, such as westeurope."
  }
}

variable "name" {
  description = "Prefix of every resource name; the globally unique names (IoT Hub, DPS, storage account, registry, PostgreSQL) get a suffix derived from the subscription."
  type        = string
  default     = "ember"
  validation {
    condition     = can(regex("^[a-z][a-z0-9]{1,9}$", var.name))
    error_message = "name must be 2-10 lowercase letters and digits, starting with a letter (storage account names allow nothing else)."
  }
}

variable "namespace" {
  description = "The Kubernetes namespace of deploy/k8s/overlays/azure (the federated credential names its service account)."
  type        = string
  default     = "ember"
}

variable "iothub_sku" {
  description = "IoT Hub tier: S1 (400,000 messages a day per unit), S2 (6 million), S3 (300 million); messages are metered in 4 KB blocks. docs/deploy-azure.md shows which is cheapest for 1,000 and 10,000 devices."
  type        = string
  default     = "S1"
  validation {
    condition     = contains(["S1", "S2", "S3"], var.iothub_sku)
    error_message = "iothub_sku must be S1, S2 or S3 (the free and basic tiers have no device twin or cloud-to-device path)."
  }
}

variable "iothub_units" {
  description = "IoT Hub units of var.iothub_sku (S1, S2: up to 200; S3: up to 10)."
  type        = number
  default     = 1
  validation {
    condition     = var.iothub_units >= 1 && var.iothub_units <= 200 && floor(var.iothub_units) == var.iothub_units
    error_message = "iothub_units must be a whole number from 1 to 200 (S1 and S2's limit; S3's is 10)."
  }
}

variable "iothub_partitions" {
  description = "Partitions of the hub's built-in Event Hubs-compatible endpoint: the most fleet replicas that can read in parallel. Fixed at creation."
  type        = number
  default     = 4
  validation {
    condition     = var.iothub_partitions >= 2 && var.iothub_partitions <= 32
    error_message = "iothub_partitions must be 2 to 32."
  }
}

variable "iothub_retention_days" {
  description = "Days the built-in endpoint keeps events: a fleet outage up to this long loses nothing."
  type        = number
  default     = 7
  validation {
    condition     = var.iothub_retention_days >= 1 && var.iothub_retention_days <= 7
    error_message = "iothub_retention_days must be 1 to 7 (S1's limit)."
  }
}

variable "device_source_cidrs" {
  description = "IP ranges devices connect to IoT Hub and DPS from; [\"0.0.0.0/0\"] (the default) leaves the hub open to the internet, which devices on unknown networks need (they authenticate with X.509 or SAS either way)."
  type        = list(string)
  default     = ["0.0.0.0/0"]
  validation {
    condition     = length(var.device_source_cidrs) > 0 && alltrue([for c in var.device_source_cidrs : can(cidrhost(c, 0))])
    error_message = "device_source_cidrs must list at least one valid CIDR block."
  }
}

variable "api_authorized_cidrs" {
  description = "CIDR blocks allowed to reach the AKS API server (where you run kubectl / scripts/up.sh)."
  type        = list(string)
  validation {
    condition     = length(var.api_authorized_cidrs) > 0 && alltrue([for c in var.api_authorized_cidrs : can(cidrhost(c, 0)) && c != "0.0.0.0/0"])
    error_message = "api_authorized_cidrs must list at least one valid CIDR block, and not 0.0.0.0/0 (e.g. your public address with /32)."
  }
}

variable "aks_admin_group_object_ids" {
  description = "Entra ID group object IDs whose members are cluster admins (Azure RBAC for Kubernetes); empty: only the identity running Terraform gets the admin role."
  type        = list(string)
  default     = []
}

variable "aks_vm_size" {
  description = "VM size of the AKS node pool."
  type        = string
  default     = "Standard_D2ds_v5"
}

variable "aks_node_count_max" {
  description = "The node pool's autoscaling maximum (the minimum is 2, one per zone of two)."
  type        = number
  default     = 4
  validation {
    condition     = var.aks_node_count_max >= 2 && var.aks_node_count_max <= 100
    error_message = "aks_node_count_max must be 2 to 100."
  }
}

variable "postgres_sku" {
  description = "PostgreSQL Flexible Server SKU (B_Standard_B1ms for trials, GP_Standard_D2ds_v5 for production)."
  type        = string
  default     = "GP_Standard_D2ds_v5"
}

variable "postgres_storage_mb" {
  description = "PostgreSQL storage in MB (32768 and up, Azure's steps)."
  type        = number
  default     = 32768
}

variable "postgres_high_availability" {
  description = "Zone-redundant standby for PostgreSQL (doubles its compute cost)."
  type        = bool
  default     = false
}

variable "postgres_geo_redundant_backup" {
  description = "Geo-redundant backups for PostgreSQL (fixed at creation)."
  type        = bool
  default     = true
}

variable "noncurrent_versions_kept_days" {
  description = "Blob versions and deleted blobs/containers are kept this many days (soft delete)."
  type        = number
  default     = 30
  validation {
    condition     = var.noncurrent_versions_kept_days >= 1 && var.noncurrent_versions_kept_days <= 365
    error_message = "noncurrent_versions_kept_days must be 1 to 365."
  }
}

variable "state_dir" {
  description = "Where the agent profile is written (absolute path); empty: deploy/.state/azure in the repository. scripts/up.sh keeps the PKI there too."
  type        = string
  default     = ""
}

variable "storage_replication" {
  description = "Replication of the storage account: GZRS (three zones here plus a paired region, the default), RAGZRS, GRS or RAGRS."
  type        = string
  default     = "GZRS"
  validation {
    condition     = contains(["GZRS", "RAGZRS", "GRS", "RAGRS"], var.storage_replication)
    error_message = "storage_replication must be GZRS, RAGZRS, GRS or RAGRS (a copy outside the region)."
  }
}
