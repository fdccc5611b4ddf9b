terraform {
  required_version = ">= 1.5"
  required_providers {
    azurerm = {
      source  = "hashicorp/azurerm"
      version = "~> 4.20"
    }
    local = {
      source  = "hashicorp/local"
      version = "~> 2.5"
    }
  }
}

provider "azurerm" {
  subscription_id = var.subscription_id
  # The storage account has shared keys disabled: containers are managed through Azure AD
  # (Entra ID) and Azure Resource Manager, never with an account key.
  storage_use_azuread = true
  features {
    # The group is Ember's own: AKS monitoring adds data collection rules to it that Terraform
    # does not manage, and destroy must remove them with the group.
    resource_group {
      prevent_deletion_if_contains_resources = false
    }
  }
}
