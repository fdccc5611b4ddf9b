# PostgreSQL 15 Flexible Server with private access: its address is in the delegated subnet,
# its name resolves in the private DNS zone, public network access is off. Authentication is
# Entra ID only (no password exists, so none can leak into the state): the fleet's managed
# identity is the server's Entra administrator (the server holds only the `ember` database) and
# signs in with a workload-identity token; TLS is required (require_secure_transport, TLS 1.2+).
# The fleet's Entra token sign-in and TLS to PostgreSQL are part of issue 19's Rust work.

resource "azurerm_postgresql_flexible_server" "ember" {
  # checkov:skip=CKV2_AZURE_57: private access (VNet integration: delegated subnet + private DNS zone, public access off) is used; a private endpoint is the other, mutually exclusive, networking mode of Flexible Server
  name                          = "${var.name}-pg-${local.suffix}"
  resource_group_name           = azurerm_resource_group.ember.name
  location                      = azurerm_resource_group.ember.location
  version                       = "15"
  sku_name                      = var.postgres_sku
  storage_mb                    = var.postgres_storage_mb
  auto_grow_enabled             = true
  delegated_subnet_id           = azurerm_subnet.postgres.id
  private_dns_zone_id           = azurerm_private_dns_zone.postgres.id
  public_network_access_enabled = false
  backup_retention_days         = 14
  geo_redundant_backup_enabled  = var.postgres_geo_redundant_backup
  zone                          = "1"

  authentication {
    active_directory_auth_enabled = true
    password_auth_enabled         = false
    tenant_id                     = data.azurerm_client_config.current.tenant_id
  }

  dynamic "high_availability" {
    for_each = var.postgres_high_availability ? [1] : []
    content {
      mode                      = "ZoneRedundant"
      standby_availability_zone = "2"
    }
  }

  tags       = local.tags
  depends_on = [azurerm_private_dns_zone_virtual_network_link.zone]
}

resource "azurerm_postgresql_flexible_server_database" "ember" {
  name      = "ember"
  server_id = azurerm_postgresql_flexible_server.ember.id
  charset   = "UTF8"
  collation = "en_US.utf8"
}

resource "azurerm_postgresql_flexible_server_active_directory_administrator" "fleet" {
  server_name         = azurerm_postgresql_flexible_server.ember.name
  resource_group_name = azurerm_resource_group.ember.name
  tenant_id           = data.azurerm_client_config.current.tenant_id
  object_id           = azurerm_user_assigned_identity.fleet.principal_id
  principal_name      = azurerm_user_assigned_identity.fleet.name
  principal_type      = "ServicePrincipal"
}

# TLS 1.2 and up, required; connections and checkpoints logged.
resource "azurerm_postgresql_flexible_server_configuration" "settings" {
  for_each = {
    require_secure_transport     = "on"
    ssl_min_protocol_version     = "TLSv1.2"
    log_checkpoints              = "on"
    log_connections              = "on"
    log_disconnections           = "on"
    "connection_throttle.enable" = "on"
  }
  name      = each.key
  server_id = azurerm_postgresql_flexible_server.ember.id
  value     = each.value
}
