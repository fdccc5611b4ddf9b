# What the cluster runs comes from deploy/k8s/overlays/azure; this file writes, under
# deploy/.state/azure/k8s, the kustomization that takes that overlay with this subscription's
# names (registry, the managed identity's client id, storage account, fleet configuration),
# and the agent profile under local.state_dir. Neither file holds a secret.

locals {
  # Always inside the repository: kustomize takes the overlay by a relative path only.
  k8s_dir      = "${local.repo}/deploy/.state/azure/k8s"
  dps_endpoint = "global.azure-devices-provisioning.net"
}

resource "local_file" "fleet_toml" {
  filename        = "${local.k8s_dir}/fleet.toml"
  file_permission = "0644"
  content = templatefile("${path.module}/templates/fleet.toml.tftpl", {
    hub            = azurerm_iothub.ember.hostname
    consumer_group = azurerm_iothub_consumer_group.fleet.name
    partitions     = var.iothub_partitions
  })
}

resource "local_file" "kustomization" {
  filename        = "${local.k8s_dir}/kustomization.yaml"
  file_permission = "0644"
  content = templatefile("${path.module}/templates/kustomization.yaml.tftpl", {
    overlay         = "../../../k8s/overlays/azure"
    namespace       = var.namespace
    registry        = azurerm_container_registry.ember.login_server
    client_id       = azurerm_user_assigned_identity.fleet.client_id
    tenant_id       = data.azurerm_client_config.current.tenant_id
    storage_account = azurerm_storage_account.ember.name
    fleet_toml_sha  = sha256(local_file.fleet_toml.content)
  })
}

resource "local_file" "agent_profile" {
  filename        = "${local.state_dir}/agent-profile.toml"
  file_permission = "0644"
  content = templatefile("${path.module}/templates/agent-profile.toml.tftpl", {
    hub          = azurerm_iothub.ember.hostname
    dps_endpoint = local.dps_endpoint
    id_scope     = azurerm_iothub_dps.ember.id_scope
    ca_file      = "${local.state_dir}/pki/ca.pem"
  })
}
