# Ember on Azure: devices connect to Azure IoT Hub (MQTT, X.509 or SAS, device twin; the agent's
# azure-iot-hub profile, issue 19) and register themselves through the Device Provisioning
# Service with the fleet CA's X.509 enrollment group; IoT Hub routes telemetry and device
# connection-state events to its built-in Event Hubs-compatible endpoint, which the fleet reads
# with its own consumer group (the Event Hubs source, issue 19); the fleet runs on AKS with a
# user-assigned managed identity (workload identity federation, no client secret), stores in
# PostgreSQL Flexible Server (private access only) and keeps model bundles and the data lake
# in a storage account reachable only through a private endpoint.
#
#   scripts/up.sh azure      # prerequisites, terraform apply, DPS link + enrollment group, kubectl apply
#   scripts/down.sh azure    # terraform destroy, removes local state
#
# docs/deploy-azure.md is the guide (architecture, variables, cost, what was not tested).

data "azurerm_client_config" "current" {}

locals {
  repo      = abspath("${path.module}/../..")
  state_dir = var.state_dir != "" ? var.state_dir : "${local.repo}/deploy/.state/azure"
  # Globally unique names: the prefix plus a stable suffix derived from the subscription.
  suffix = substr(sha1("${var.subscription_id}/${var.name}"), 0, 8)
  tags = {
    app        = "ember"
    managed-by = "terraform"
  }
  fleet_ksa = "ember-fleet"
}

resource "azurerm_resource_group" "ember" {
  name     = "${var.name}-rg"
  location = var.location
  tags     = local.tags
}

# Logs and metrics of AKS, the hub and the storage account.
resource "azurerm_log_analytics_workspace" "ember" {
  name                = "${var.name}-logs-${local.suffix}"
  location            = azurerm_resource_group.ember.location
  resource_group_name = azurerm_resource_group.ember.name
  sku                 = "PerGB2018"
  retention_in_days   = 30
  tags                = local.tags
}
