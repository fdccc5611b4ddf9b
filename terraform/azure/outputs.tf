output "iothub_hostname" {
  description = "The IoT Hub devices connect to (MQTT over TLS, port 8883, or 443 with WebSockets)."
  value       = azurerm_iothub.ember.hostname
}

output "iothub_name" {
  description = "The IoT Hub's name (az iot hub ... --hub-name NAME)."
  value       = azurerm_iothub.ember.name
}

output "iothub_eventhub_endpoint" {
  description = "The hub's built-in Event Hubs-compatible endpoint (the fleet's consumer group: ember-fleet)."
  value       = azurerm_iothub.ember.event_hub_events_endpoint
}

output "dps_name" {
  description = "The Device Provisioning Service (scripts/up.sh links it to the hub and creates the enrollment group)."
  value       = azurerm_iothub_dps.ember.name
}

output "dps_id_scope" {
  description = "The DPS ID scope devices register with."
  value       = azurerm_iothub_dps.ember.id_scope
}

output "agent_profile_file" {
  description = "The agent profile (hub, DPS, TLS files): the azure-iot-hub profile of issue 19."
  value       = local_file.agent_profile.filename
}

output "kustomization_dir" {
  description = "The generated kustomization (deploy/k8s/overlays/azure with this subscription's names)."
  value       = dirname(local_file.kustomization.filename)
}

output "resource_group" {
  description = "The resource group holding everything."
  value       = azurerm_resource_group.ember.name
}

output "aks_name" {
  description = "The AKS cluster (az aks get-credentials --resource-group RG --name NAME)."
  value       = azurerm_kubernetes_cluster.ember.name
}

output "registry" {
  description = "The container registry scripts/up.sh pushes ember-fleet to."
  value       = azurerm_container_registry.ember.login_server
}

output "postgres_fqdn" {
  description = "PostgreSQL's private host name (resolves inside the VNet only)."
  value       = azurerm_postgresql_flexible_server.ember.fqdn
}

output "fleet_identity" {
  description = "The fleet's managed identity: client id (workload identity) and name (its PostgreSQL role)."
  value = {
    client_id = azurerm_user_assigned_identity.fleet.client_id
    name      = azurerm_user_assigned_identity.fleet.name
  }
}

output "storage_account" {
  description = "The storage account (containers models and lake)."
  value       = azurerm_storage_account.ember.name
}
