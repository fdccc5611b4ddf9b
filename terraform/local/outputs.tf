output "dashboard_url" {
  description = "The fleet's dashboard (HTTPS; its certificate is signed by ca_file)."
  value       = "https://localhost:${var.https_port}/dashboard/"
  depends_on  = [terraform_data.stack]
}

output "api_url" {
  description = "The fleet's REST API."
  value       = "https://localhost:${var.https_port}/api/v1"
  depends_on  = [terraform_data.stack]
}

output "ca_file" {
  description = "The stack's CA certificate (trust it for the API and the broker)."
  value       = "${local.state}/fleet/ca.pem"
  depends_on  = [terraform_data.secrets]
}

output "read_token_file" {
  description = "A file holding a read-scope API token (mode 0600)."
  value       = "${local.state}/read-token"
  depends_on  = [terraform_data.stack]
}

output "admin_token_file" {
  description = "A file holding the admin API token (the fleet's bootstrap token, mode 0600)."
  value       = "${local.state}/admin-token"
  depends_on  = [terraform_data.secrets]
}

output "mqtt_url" {
  description = "The broker, for devices outside the stack (mutual TLS)."
  value       = "mqtts://localhost:${var.mqtt_port}"
  depends_on  = [terraform_data.stack]
}
