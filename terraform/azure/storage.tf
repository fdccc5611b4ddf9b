# One storage account for signed model bundles (container `models`: the fleet's [models]
# store = "az://models/...") and the data lake (container `lake`): no public network access
# (the fleet reaches it through a private endpoint in the VNet), no anonymous blob access, no
# shared keys (Entra ID only), TLS 1.2 minimum, infrastructure (double) encryption, versioning
# and soft delete. The containers are managed through Azure Resource Manager, so Terraform needs
# no data-plane access to the account.

resource "azurerm_storage_account" "ember" {
  # checkov:skip=CKV2_AZURE_1: customer-managed keys are optional; Microsoft-managed keys plus infrastructure encryption (two layers) by default
  # checkov:skip=CKV_AZURE_33: queue logging: the account has no queues (blobs only); blob logs go to Log Analytics (azurerm_monitor_diagnostic_setting.blob)
  name                              = "${var.name}st${local.suffix}"
  resource_group_name               = azurerm_resource_group.ember.name
  location                          = azurerm_resource_group.ember.location
  account_kind                      = "StorageV2"
  account_tier                      = "Standard"
  account_replication_type          = var.storage_replication
  min_tls_version                   = "TLS1_2"
  https_traffic_only_enabled        = true
  public_network_access_enabled     = false
  allow_nested_items_to_be_public   = false
  shared_access_key_enabled         = false
  default_to_oauth_authentication   = true
  infrastructure_encryption_enabled = true
  cross_tenant_replication_enabled  = false
  local_user_enabled                = false
  sftp_enabled                      = false

  network_rules {
    default_action = "Deny"
    bypass         = ["AzureServices"]
  }

  blob_properties {
    versioning_enabled  = true
    change_feed_enabled = true
    delete_retention_policy {
      days = var.noncurrent_versions_kept_days
    }
    container_delete_retention_policy {
      days = var.noncurrent_versions_kept_days
    }
  }

  sas_policy {
    expiration_period = "00.01:00:00"
    expiration_action = "Log"
  }

  tags = local.tags
}

resource "azurerm_storage_container" "ember" {
  # checkov:skip=CKV2_AZURE_21: read requests are logged by the account's blob diagnostic setting (azurerm_monitor_diagnostic_setting.blob), which checkov does not relate to the container
  for_each              = toset(["models", "lake"])
  name                  = each.value
  storage_account_id    = azurerm_storage_account.ember.id
  container_access_type = "private"
}

# Versions older than var.noncurrent_versions_kept_days are deleted; the lake cools to Cool
# after 30 days and to Archive after 180.
resource "azurerm_storage_management_policy" "ember" {
  storage_account_id = azurerm_storage_account.ember.id
  rule {
    name    = "versions"
    enabled = true
    filters {
      blob_types = ["blockBlob"]
    }
    actions {
      version {
        delete_after_days_since_creation = var.noncurrent_versions_kept_days
      }
    }
  }
  rule {
    name    = "lake-tiering"
    enabled = true
    filters {
      blob_types   = ["blockBlob"]
      prefix_match = ["lake/"]
    }
    actions {
      base_blob {
        tier_to_cool_after_days_since_modification_greater_than    = 30
        tier_to_archive_after_days_since_modification_greater_than = 180
      }
    }
  }
}

resource "azurerm_private_endpoint" "blob" {
  name                = "${var.name}-blob-pe"
  location            = azurerm_resource_group.ember.location
  resource_group_name = azurerm_resource_group.ember.name
  subnet_id           = azurerm_subnet.endpoints.id

  private_service_connection {
    name                           = "blob"
    private_connection_resource_id = azurerm_storage_account.ember.id
    subresource_names              = ["blob"]
    is_manual_connection           = false
  }
  private_dns_zone_group {
    name                 = "blob"
    private_dns_zone_ids = [azurerm_private_dns_zone.blob.id]
  }
  tags = local.tags
}

resource "azurerm_monitor_diagnostic_setting" "blob" {
  name                       = "ember-logs"
  target_resource_id         = "${azurerm_storage_account.ember.id}/blobServices/default"
  log_analytics_workspace_id = azurerm_log_analytics_workspace.ember.id
  enabled_log {
    category = "StorageRead"
  }
  enabled_log {
    category = "StorageWrite"
  }
  enabled_log {
    category = "StorageDelete"
  }
  metric {
    category = "Transaction"
  }
}
