# The on-premises (local) environment as Terraform: the stack of deploy/compose.yaml on this
# machine's Docker Engine. Only Terraform's builtin provider (terraform_data + local-exec)
# is used, so `terraform init` needs no download. Each step is deploy/local/stack.sh, the same
# steps scripts/up.sh local runs; destroy runs them backwards.
#
#   terraform -chdir=terraform/local init
#   terraform -chdir=terraform/local apply       # PKI, missing images, stack, health
#   terraform -chdir=terraform/local destroy     # containers, networks, volumes, secrets
#
# Private keys and passwords are files under var.state_dir (mode 0600); the Terraform state
# holds only their paths.
terraform {
  required_version = ">= 1.5"
}

locals {
  repo  = abspath("${path.module}/../..")
  stack = "${local.repo}/deploy/local/stack.sh"
  state = var.state_dir != "" ? var.state_dir : "${local.repo}/deploy/.state/local"
  # What every step sees; destroy-time provisioners may read only self, so each resource
  # keeps a copy in its input.
  env = {
    EMBER_STATE_DIR       = local.state
    EMBER_AGENTS          = tostring(var.agents)
    EMBER_AGENT_PLATFORMS = join(",", var.agent_platforms)
    EMBER_HTTPS_PORT      = tostring(var.https_port)
    EMBER_MQTT_PORT       = tostring(var.mqtt_port)
    EMBER_COMPOSE_PROJECT = var.project
    EMBER_WAIT_S          = tostring(var.wait_timeout_s)
  }
}

# The images: built when missing (deploy/build-images.sh); kept at destroy (a cache, not state).
resource "terraform_data" "images" {
  input = { stack = local.stack, env = local.env }
  provisioner "local-exec" {
    command     = "bash '${self.input.stack}' images"
    environment = self.input.env
  }
}

# The PKI and secrets (CA, broker, fleet and device certificates, database password, the
# fleet's configuration): created at apply, deleted at destroy.
resource "terraform_data" "secrets" {
  depends_on = [terraform_data.images]
  input      = { stack = local.stack, env = local.env }
  provisioner "local-exec" {
    command     = "bash '${self.input.stack}' secrets"
    environment = self.input.env
  }
  provisioner "local-exec" {
    when        = destroy
    command     = "bash '${self.input.stack}' clean"
    environment = self.input.env
  }
}

# The stack: up and healthy at apply (and a read-scope API token); removed with its networks
# and volumes at destroy.
resource "terraform_data" "stack" {
  depends_on = [terraform_data.secrets]
  input      = { stack = local.stack, env = local.env }
  provisioner "local-exec" {
    command     = "bash '${self.input.stack}' start && bash '${self.input.stack}' wait && bash '${self.input.stack}' token"
    environment = self.input.env
  }
  provisioner "local-exec" {
    when        = destroy
    command     = "bash '${self.input.stack}' down"
    environment = self.input.env
  }
}
