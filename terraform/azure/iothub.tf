# Azure IoT Hub (S1 by default: var.iothub_sku, var.iothub_units) and the Device Provisioning
# Service.
#
# Devices (the agent's azure-iot-hub profile, issue 19) connect over MQTT with TLS 1.2 and X.509
# (or SAS) from the internet, so the hub's public network access stays enabled, narrowed by
# var.device_source_cidrs when devices sit behind known addresses. Two routes send device
# telemetry (every device-to-cloud message) and device connection-state events (the fleet's
# presence) to the built-in `events` endpoint (Event Hubs-compatible, var.iothub_partitions
# partitions, var.iothub_retention_days of retention); the fleet reads it with its own consumer
# group, `ember-fleet`.
#
# Not in Terraform, on purpose (their secrets would land in the state), done by scripts/up.sh
# with the az CLI:
#   * linking DPS to the hub (`az iot dps linked-hub create`: the CLI reads the hub's
#     connection string itself);
#   * the X.509 enrollment group for the fleet's CA (`az iot dps enrollment-group create
#     --certificate-path <state>/pki/ca.pem`: the azurerm provider has no enrollment resource);
#   * the fleet's read access to the built-in endpoint: a shared access policy with
#     ServiceConnect only (`az iot hub policy create --permissions ServiceConnect`), whose
#     connection string goes straight into a Kubernetes Secret. Microsoft documents Entra ID
#     (managed identity) authorization for IoT Hub's service APIs, which the fleet uses for twin
#     updates; reading the built-in endpoint is Event Hubs' AMQP with the hub's SAS policies.

resource "azurerm_iothub" "ember" {
  # checkov:skip=CKV_AZURE_108: devices connect from the internet (cellular, customer networks); they authenticate with X.509 or SAS per device, and var.device_source_cidrs narrows the IP filter when their addresses are known
  name                          = "${var.name}-hub-${local.suffix}"
  resource_group_name           = azurerm_resource_group.ember.name
  location                      = azurerm_resource_group.ember.location
  public_network_access_enabled = true
  min_tls_version               = "1.2"
  local_authentication_enabled  = true # device SAS and the ServiceConnect policy above

  sku {
    name     = var.iothub_sku
    capacity = var.iothub_units
  }

  event_hub_partition_count   = var.iothub_partitions
  event_hub_retention_in_days = var.iothub_retention_days

  dynamic "network_rule_set" {
    for_each = contains(var.device_source_cidrs, "0.0.0.0/0") ? [] : [1]
    content {
      default_action                     = "Deny"
      apply_to_builtin_eventhub_endpoint = false
      dynamic "ip_rule" {
        for_each = var.device_source_cidrs
        content {
          name    = "devices-${ip_rule.key}"
          ip_mask = ip_rule.value
          action  = "Allow"
        }
      }
    }
  }

  route {
    name           = "telemetry"
    source         = "DeviceMessages"
    condition      = "true"
    endpoint_names = ["events"]
    enabled        = true
  }

  route {
    name           = "connection-state"
    source         = "DeviceConnectionStateEvents"
    condition      = "true"
    endpoint_names = ["events"]
    enabled        = true
  }

  # Everything is routed explicitly above; nothing falls back.
  fallback_route {
    source         = "DeviceMessages"
    condition      = "true"
    endpoint_names = ["events"]
    enabled        = false
  }

  identity {
    type = "SystemAssigned"
  }

  tags = local.tags
}

resource "azurerm_iothub_consumer_group" "fleet" {
  name                   = "ember-fleet"
  iothub_name            = azurerm_iothub.ember.name
  eventhub_endpoint_name = "events"
  resource_group_name    = azurerm_resource_group.ember.name
}

resource "azurerm_monitor_diagnostic_setting" "iothub" {
  name                       = "ember-logs"
  target_resource_id         = azurerm_iothub.ember.id
  log_analytics_workspace_id = azurerm_log_analytics_workspace.ember.id
  enabled_log {
    category = "Connections"
  }
  enabled_log {
    category = "DeviceTelemetry"
  }
  enabled_log {
    category = "Routes"
  }
  enabled_log {
    category = "TwinQueries"
  }
  metric {
    category = "AllMetrics"
  }
}

resource "azurerm_iothub_dps" "ember" {
  name                          = "${var.name}-dps-${local.suffix}"
  resource_group_name           = azurerm_resource_group.ember.name
  location                      = azurerm_resource_group.ember.location
  allocation_policy             = "Hashed"
  public_network_access_enabled = true
  data_residency_enabled        = false

  sku {
    name     = "S1"
    capacity = 1
  }

  # Linked by scripts/up.sh (az iot dps linked-hub create), see the top of this file.
  lifecycle {
    ignore_changes = [linked_hub]
  }

  tags = local.tags
}
