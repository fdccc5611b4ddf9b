# The fleet's identity: a user-assigned managed identity, federated with the ember-fleet
# Kubernetes service account through the cluster's OIDC issuer (workload identity: the pod
# exchanges its projected service-account token for an Entra token; no client secret, no
# certificate). Every role is assigned on one resource:
#
#   Storage Blob Data Contributor  the storage account (models and lake containers)
#   IoT Hub Twin Contributor       the hub (desired-state sink: twin desired properties)
#   PostgreSQL Entra administrator the server (postgres.tf)
#
# Reading the built-in Event Hubs-compatible endpoint is AMQP with the hub's ServiceConnect
# policy (the Event Hubs "receive" right on that endpoint only; see iothub.tf), not an RBAC role.

resource "azurerm_user_assigned_identity" "fleet" {
  name                = "${var.name}-fleet"
  location            = azurerm_resource_group.ember.location
  resource_group_name = azurerm_resource_group.ember.name
  tags                = local.tags
}

resource "azurerm_federated_identity_credential" "fleet" {
  name                = "${var.name}-fleet-aks"
  resource_group_name = azurerm_resource_group.ember.name
  parent_id           = azurerm_user_assigned_identity.fleet.id
  audience            = ["api://AzureADTokenExchange"]
  issuer              = azurerm_kubernetes_cluster.ember.oidc_issuer_url
  subject             = "system:serviceaccount:${var.namespace}:${local.fleet_ksa}"
}

resource "azurerm_role_assignment" "fleet_blob" {
  scope                = azurerm_storage_account.ember.id
  role_definition_name = "Storage Blob Data Contributor"
  principal_id         = azurerm_user_assigned_identity.fleet.principal_id
  principal_type       = "ServicePrincipal"
}

resource "azurerm_role_assignment" "fleet_twin" {
  scope                = azurerm_iothub.ember.id
  role_definition_name = "IoT Hub Twin Contributor"
  principal_id         = azurerm_user_assigned_identity.fleet.principal_id
  principal_type       = "ServicePrincipal"
}
