output "endpoint" {
  description = "The account's ATS data endpoint (MQTT host and TLS SNI)."
  value       = data.aws_iot_endpoint.ats.endpoint_address
}

output "stream_arn" {
  description = "The ingest stream."
  value       = aws_kinesis_stream.ingest.arn
}

output "stream_name" {
  description = "The ingest stream's name (fleet.toml [ingest.kinesis] stream)."
  value       = aws_kinesis_stream.ingest.name
}

output "desired_topic_arn" {
  description = "Topic ARN pattern of every device's desired state (the fleet's data-plane publish)."
  value       = "${local.arn_prefix}:topic/ember/v1/*/desired"
}

output "device_policy" {
  description = "The device policy document (decoded), for tests and review."
  value       = local.device_policy
}

output "certificate_pems" {
  description = "Thing name => certificate (PEM, public) for the agent's cert_file."
  # The provider marks the PEM sensitive along with the (here absent) private key; a certificate is public.
  value = { for k, c in aws_iot_certificate.device : k => nonsensitive(c.certificate_pem) }
}

output "fleet_certificate_pem" {
  description = "The fleet's certificate (PEM), when fleet_csr was given."
  value       = var.fleet_csr == "" ? "" : nonsensitive(aws_iot_certificate.fleet[0].certificate_pem)
}
