# One VNet: the AKS nodes and pods (Azure CNI), a subnet delegated to PostgreSQL Flexible Server
# (private access), and a subnet for private endpoints (the storage account). Each subnet has a
# network security group; nothing in the VNet has a public address.

resource "azurerm_virtual_network" "ember" {
  name                = "${var.name}-vnet"
  location            = azurerm_resource_group.ember.location
  resource_group_name = azurerm_resource_group.ember.name
  address_space       = ["10.40.0.0/16"]
  tags                = local.tags
}

resource "azurerm_subnet" "aks" {
  name                 = "aks"
  resource_group_name  = azurerm_resource_group.ember.name
  virtual_network_name = azurerm_virtual_network.ember.name
  address_prefixes     = ["10.40.0.0/20"]
}

resource "azurerm_subnet" "postgres" {
  name                 = "postgres"
  resource_group_name  = azurerm_resource_group.ember.name
  virtual_network_name = azurerm_virtual_network.ember.name
  address_prefixes     = ["10.40.16.0/24"]
  delegation {
    name = "postgres-flexible"
    service_delegation {
      name    = "Microsoft.DBforPostgreSQL/flexibleServers"
      actions = ["Microsoft.Network/virtualNetworks/subnets/join/action"]
    }
  }
}

resource "azurerm_subnet" "endpoints" {
  name                              = "endpoints"
  resource_group_name               = azurerm_resource_group.ember.name
  virtual_network_name              = azurerm_virtual_network.ember.name
  address_prefixes                  = ["10.40.17.0/24"]
  private_endpoint_network_policies = "Enabled"
}

# Azure's default rules (VNet in, load balancer probes in, everything else from the internet
# denied) are what each subnet needs; the groups exist so that rules are added in one place.
resource "azurerm_network_security_group" "subnet" {
  for_each            = toset(["aks", "postgres", "endpoints"])
  name                = "${var.name}-${each.key}-nsg"
  location            = azurerm_resource_group.ember.location
  resource_group_name = azurerm_resource_group.ember.name
  tags                = local.tags
}

resource "azurerm_subnet_network_security_group_association" "subnet" {
  for_each = {
    aks       = azurerm_subnet.aks.id
    postgres  = azurerm_subnet.postgres.id
    endpoints = azurerm_subnet.endpoints.id
  }
  subnet_id                 = each.value
  network_security_group_id = azurerm_network_security_group.subnet[each.key].id
}

# Private DNS: PostgreSQL's private access name and the storage account's private endpoint.
resource "azurerm_private_dns_zone" "postgres" {
  name                = "${var.name}.private.postgres.database.azure.com"
  resource_group_name = azurerm_resource_group.ember.name
  tags                = local.tags
}

resource "azurerm_private_dns_zone" "blob" {
  name                = "privatelink.blob.core.windows.net"
  resource_group_name = azurerm_resource_group.ember.name
  tags                = local.tags
}

resource "azurerm_private_dns_zone_virtual_network_link" "zone" {
  for_each = {
    postgres = azurerm_private_dns_zone.postgres.name
    blob     = azurerm_private_dns_zone.blob.name
  }
  name                  = "${var.name}-${each.key}"
  resource_group_name   = azurerm_resource_group.ember.name
  private_dns_zone_name = each.value
  virtual_network_id    = azurerm_virtual_network.ember.id
  registration_enabled  = false
  tags                  = local.tags
}
