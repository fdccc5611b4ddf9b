# The agent profile: what an agent needs to reach IoT Core. scripts/up.sh aws writes it to
# deploy/.state/aws/agent-profile.json and builds each device's agent.toml from it.
locals {
  agent_profile = {
    profile  = "aws-iot-core"
    endpoint = module.iot.endpoint
    # 8883: MQTT over TLS. 443 needs ALPN x-amzn-mqtt-ca (networks that allow only HTTPS).
    port     = 8883
    alt_port = 443
    alpn     = "x-amzn-mqtt-ca"
    # The server name the agent sends (SNI) is the endpoint itself.
    sni = module.iot.endpoint
    # Amazon Root CA 1 (RSA) signs the ATS endpoints.
    ca_url    = "https://www.amazontrust.com/repository/AmazonRootCA1.pem"
    client_id = "{device_id}"
    topics = {
      telemetry = "ember/v1/{device_id}/telemetry"
      inference = "ember/v1/{device_id}/inference"
      status    = "ember/v1/{device_id}/status"
      heartbeat = "ember/v1/{device_id}/heartbeat"
      desired   = "ember/v1/{device_id}/desired"
    }
    # IoT Core's quotas the agent applies (docs/deploy-aws.md).
    limits = {
      max_payload_bytes    = 131072
      keep_alive_min_s     = 30
      keep_alive_max_s     = 1200
      publish_per_second   = 100
      max_qos              = 1
      thing_name_max_bytes = 128
    }
  }
}

output "agent_profile" {
  description = "What agents need to connect (endpoint, port, ALPN, topics, limits)."
  value       = local.agent_profile
}

output "agent_profile_json" {
  description = "The agent profile as the JSON file scripts/up.sh aws writes."
  value       = jsonencode(local.agent_profile)
}

output "device_certificates" {
  description = "Thing name => certificate (PEM; public) issued from the device's CSR."
  value       = module.iot.certificate_pems
}

output "kinesis_stream" {
  description = "The ingest stream (fleet.toml [ingest.kinesis] stream)."
  value       = module.iot.stream_name
}

output "buckets" {
  description = "S3 buckets: model bundles and the data lake."
  value       = { bundles = module.bundles_bucket.bucket, datalake = module.datalake_bucket.bucket }
}

output "database_endpoint" {
  description = "host:port of RDS PostgreSQL (private)."
  value       = module.database.endpoint
}

output "database_secret_arn" {
  description = "Secrets Manager secret with the database master password (RDS-managed)."
  value       = module.database.master_secret_arn
}

output "eks_cluster" {
  description = "The EKS cluster (aws eks update-kubeconfig --name ...)."
  value       = module.eks.cluster_name
}

output "fleet_role_arn" {
  description = "The fleet's IRSA role, annotated on its service account."
  value       = module.eks.fleet_role_arn
}

output "region" {
  description = "The region of this deployment."
  value       = var.region
}
