# AKS: API server reachable only from var.api_authorized_cidrs, Azure CNI with Azure network
# policy (Kubernetes NetworkPolicy enforced), Entra ID authentication with Azure RBAC and local
# accounts disabled, a system-assigned control-plane identity, the OIDC issuer and workload
# identity (the fleet's federated credential, identity.tf), Container Insights, Azure Policy,
# the Key Vault secrets provider, automatic patch upgrades. One autoscaled pool across zones.

resource "azurerm_kubernetes_cluster" "ember" {
  # checkov:skip=CKV_AZURE_115: the API server is public but restricted to var.api_authorized_cidrs (CKV_AZURE_6), so scripts/up.sh can run kubectl from an operator's machine without a jump host in the VNet
  # checkov:skip=CKV_AZURE_117: disk encryption with customer-managed keys is optional; OS disks are ephemeral and host encryption is on (platform keys)
  # checkov:skip=CKV_AZURE_6: authorized IP ranges ARE set, from var.api_authorized_cidrs (required, validated non-empty and not 0.0.0.0/0); checkov cannot resolve a variable without a default and fails it
  # checkov:skip=CKV_AZURE_232: one small pool runs system and Ember pods alike; a dedicated system pool doubles the minimum node count for a few pods
  name                      = "${var.name}-aks"
  location                  = azurerm_resource_group.ember.location
  resource_group_name       = azurerm_resource_group.ember.name
  dns_prefix                = "${var.name}-${local.suffix}"
  sku_tier                  = "Standard"
  automatic_upgrade_channel = "patch"
  node_os_upgrade_channel   = "NodeImage"

  api_server_access_profile {
    authorized_ip_ranges = var.api_authorized_cidrs
  }

  default_node_pool {
    name                        = "system"
    vm_size                     = var.aks_vm_size
    vnet_subnet_id              = azurerm_subnet.aks.id
    auto_scaling_enabled        = true
    min_count                   = 2
    max_count                   = var.aks_node_count_max
    max_pods                    = 50
    os_disk_type                = "Ephemeral"
    os_disk_size_gb             = 64
    host_encryption_enabled     = true
    zones                       = ["1", "2", "3"]
    temporary_name_for_rotation = "systemtmp"
    upgrade_settings {
      max_surge = "33%"
    }
    tags = local.tags
  }

  identity {
    type = "SystemAssigned"
  }

  network_profile {
    network_plugin    = "azure"
    network_policy    = "azure"
    load_balancer_sku = "standard"
    service_cidr      = "10.41.0.0/16"
    dns_service_ip    = "10.41.0.10"
  }

  oidc_issuer_enabled       = true
  workload_identity_enabled = true

  role_based_access_control_enabled = true
  local_account_disabled            = true
  azure_active_directory_role_based_access_control {
    tenant_id              = data.azurerm_client_config.current.tenant_id
    azure_rbac_enabled     = true
    admin_group_object_ids = var.aks_admin_group_object_ids
  }

  oms_agent {
    log_analytics_workspace_id      = azurerm_log_analytics_workspace.ember.id
    msi_auth_for_monitoring_enabled = true
  }
  azure_policy_enabled = true
  key_vault_secrets_provider {
    secret_rotation_enabled = true
  }

  tags = local.tags
}

# The identity running Terraform (and scripts/up.sh) administers the cluster through Azure RBAC
# (local accounts are disabled); scoped to this cluster only.
resource "azurerm_role_assignment" "operator_aks_admin" {
  scope                = azurerm_kubernetes_cluster.ember.id
  role_definition_name = "Azure Kubernetes Service RBAC Cluster Admin"
  principal_id         = data.azurerm_client_config.current.object_id
}

# Images: scripts/up.sh pushes ember-fleet to this registry; the kubelet identity may pull from
# this registry only.
resource "azurerm_container_registry" "ember" {
  # checkov:skip=CKV_AZURE_139: public endpoint kept so scripts/up.sh can push from an operator's machine; anonymous pull and the admin user are disabled, pushes need Entra ID (AcrPush)
  # checkov:skip=CKV_AZURE_163: image vulnerability scanning is Microsoft Defender for Containers, a subscription-level plan outside this configuration
  # checkov:skip=CKV_AZURE_164: content trust (Docker Content Trust) needs Premium and signing keys; images are pinned by digest in the generated kustomization instead
  # checkov:skip=CKV_AZURE_165: geo-replication needs Premium; one region is the whole deployment
  # checkov:skip=CKV_AZURE_166: quarantine needs Premium and a scanner to release images
  # checkov:skip=CKV_AZURE_167: retention of untagged manifests needs Premium; scripts/up.sh pushes tagged releases only
  # checkov:skip=CKV_AZURE_233: zone redundancy needs Premium; an unavailable registry delays new pods, not running ones
  # checkov:skip=CKV_AZURE_237: dedicated data endpoints need Premium
  name                          = "${var.name}acr${local.suffix}"
  resource_group_name           = azurerm_resource_group.ember.name
  location                      = azurerm_resource_group.ember.location
  sku                           = "Standard"
  admin_enabled                 = false
  anonymous_pull_enabled        = false
  public_network_access_enabled = true
  tags                          = local.tags
}

resource "azurerm_role_assignment" "kubelet_acr_pull" {
  scope                            = azurerm_container_registry.ember.id
  role_definition_name             = "AcrPull"
  principal_id                     = azurerm_kubernetes_cluster.ember.kubelet_identity[0].object_id
  skip_service_principal_aad_check = true
}

resource "azurerm_role_assignment" "operator_acr_push" {
  scope                = azurerm_container_registry.ember.id
  role_definition_name = "AcrPush"
  principal_id         = data.azurerm_client_config.current.object_id
}
