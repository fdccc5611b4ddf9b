# Offline tests of terraform/aws with a mocked AWS provider (no account, no network):
#   terraform -chdir=terraform/aws test
# Each run applies against mock_provider "aws", so computed values are placeholders; the
# assertions check what this configuration decides: policies, privacy, encryption, outputs.

mock_provider "aws" {
  mock_data "aws_caller_identity" {
    defaults = { account_id = "123456789012" }
  }
  mock_data "aws_partition" {
    defaults = { partition = "aws" }
  }
  mock_data "aws_region" {
    defaults = { name = "eu-west-1" }
  }
  mock_data "aws_iot_endpoint" {
    defaults = { endpoint_address = "a1b2c3d4e5f6g7-ats.iot.eu-west-1.amazonaws.com" }
  }
  mock_data "aws_availability_zones" {
    defaults = { names = ["eu-west-1a", "eu-west-1b", "eu-west-1c"] }
  }
  mock_resource "aws_kms_key" {
    defaults = { arn = "arn:aws:kms:eu-west-1:123456789012:key/00000000-0000-0000-0000-000000000000" }
  }
  mock_resource "aws_kinesis_stream" {
    defaults = { arn = "arn:aws:kinesis:eu-west-1:123456789012:stream/ember-ingest" }
  }
  mock_resource "aws_iam_openid_connect_provider" {
    defaults = { arn = "arn:aws:iam::123456789012:oidc-provider/oidc.eks.eu-west-1.amazonaws.com/id/EXAMPLE" }
  }
  mock_resource "aws_eks_cluster" {
    defaults = {
      identity   = [{ oidc = [{ issuer = "https://oidc.eks.eu-west-1.amazonaws.com/id/EXAMPLE" }] }]
      vpc_config = { cluster_security_group_id = "sg-0123456789abcdef0" }
    }
  }
  mock_resource "aws_db_instance" {
    defaults = {
      master_user_secret = [{ secret_arn = "arn:aws:secretsmanager:eu-west-1:123456789012:secret:rds-db-credentials-abc" }]
    }
  }
  mock_resource "aws_iam_role" {
    defaults = { arn = "arn:aws:iam::123456789012:role/mock" }
  }
  mock_resource "aws_cloudwatch_log_group" {
    defaults = { arn = "arn:aws:logs:eu-west-1:123456789012:log-group:mock" }
  }
  mock_resource "aws_iot_certificate" {
    defaults = { arn = "arn:aws:iot:eu-west-1:123456789012:cert/mock" }
  }
  mock_resource "aws_s3_bucket" {
    defaults = { arn = "arn:aws:s3:::ember-bucket" }
  }
}

variables {
  devices = {
    d1 = "-----BEGIN CERTIFICATE REQUEST-----\nMIHHMG8CAQAwDTELMAkGA1UEAwwCZDE=\n-----END CERTIFICATE REQUEST-----\n"
    d2 = "-----BEGIN CERTIFICATE REQUEST-----\nMIHHMG8CAQAwDTELMAkGA1UEAwwCZDI=\n-----END CERTIFICATE REQUEST-----\n"
  }
}

run "device_policy_reaches_only_its_own_thing" {
  command = apply

  # Every resource the device policy grants is the connection's own thing (a policy variable,
  # never a literal device id or a wildcard), so a device cannot reach another thing's topics.
  assert {
    condition = alltrue(flatten([
      for s in module.iot.device_policy.Statement : [
        for r in flatten([s.Resource]) :
        can(regex("^arn:aws:iot:eu-west-1:123456789012:(client/\\$\\{iot:Connection\\.Thing\\.ThingName\\}|topic/ember/v1/\\$\\{iot:Connection\\.Thing\\.ThingName\\}/(telemetry|inference|status|heartbeat|desired)|topicfilter/ember/v1/\\$\\{iot:Connection\\.Thing\\.ThingName\\}/desired)$", r))
      ]
    ]))
    error_message = "a device policy resource is not confined to ember/v1/<own thing>/..."
  }
  assert {
    condition = alltrue(flatten([
      for s in module.iot.device_policy.Statement : [
        for r in flatten([s.Resource]) : !strcontains(r, "*") && !strcontains(r, "+") && !strcontains(r, "#") && !strcontains(r, "d1") && !strcontains(r, "d2")
      ]
    ]))
    error_message = "a device policy resource holds a wildcard or a literal device id"
  }
  assert {
    condition     = alltrue([for s in module.iot.device_policy.Statement : s.Effect == "Allow" && s.Condition.Bool["iot:Connection.Thing.IsAttached"] == "true"])
    error_message = "every device policy statement must require the certificate to be attached to the thing"
  }
  assert {
    condition = alltrue(flatten([
      for s in module.iot.device_policy.Statement : [for a in flatten([s.Action]) : contains(["iot:Connect", "iot:Publish", "iot:RetainPublish", "iot:Subscribe", "iot:Receive"], a)]
    ]))
    error_message = "the device policy grants an action beyond connect/publish/retain/subscribe/receive"
  }
  assert {
    condition     = contains(flatten([for s in module.iot.device_policy.Statement : flatten([s.Action])]), "iot:RetainPublish")
    error_message = "retained status and Last Will need iot:RetainPublish"
  }
  # Subscribing is limited to the device's desired state; publishing never reaches desired.
  assert {
    condition = alltrue(flatten([
      for s in module.iot.device_policy.Statement : [
        for r in flatten([s.Resource]) : !endswith(r, "/desired") if contains(flatten([s.Action]), "iot:Publish")
      ]
    ]))
    error_message = "a device may not publish desired state"
  }
  assert {
    condition     = length(output.device_certificates) == 2
    error_message = "one certificate per device"
  }
}

run "topic_rules_take_the_device_id_from_the_topic" {
  command = apply
  module {
    source = "./modules/iot"
  }
  variables {
    name            = "ember"
    fleet_csr       = ""
    kms_key         = "arn:aws:kms:eu-west-1:123456789012:key/k"
    shards          = 2
    retention_hours = 48
  }
  assert {
    condition     = one(aws_iot_topic_rule.ingest.kinesis).partition_key == "$${topic(3)}" && strcontains(aws_iot_topic_rule.ingest.sql, "topic(3) AS device") && strcontains(aws_iot_topic_rule.ingest.sql, "encode(*, 'base64') AS payload")
    error_message = "the ingest rule must key by the topic's device id and base64 the payload"
  }
  assert {
    condition     = length(aws_iot_topic_rule.ingest.error_action) == 1 && length(aws_iot_topic_rule.presence.error_action) == 1
    error_message = "topic rules need an error action"
  }
  assert {
    condition     = one(aws_iot_topic_rule.presence.kinesis).partition_key == "$${clientId}" && strcontains(aws_iot_topic_rule.presence.sql, "$aws/events/presence/+/+")
    error_message = "presence comes from lifecycle events keyed by client id (= thing name)"
  }
  assert {
    condition     = aws_kinesis_stream.ingest.encryption_type == "KMS"
    error_message = "the ingest stream must be encrypted"
  }
  assert {
    condition     = alltrue([for s in jsondecode(aws_iam_role_policy.rules.policy).Statement : !contains(flatten([s.Action]), "*") && !contains(flatten([s.Resource]), "*")])
    error_message = "the rules' role must not use wildcards"
  }
  # The fleet's MQTT identity may only publish desired state.
  assert {
    condition = alltrue(flatten([
      for s in jsondecode(aws_iot_policy.fleet.policy).Statement : [
        for r in flatten([s.Resource]) : endswith(r, "/desired") if contains(flatten([s.Action]), "iot:Publish")
      ]
    ]))
    error_message = "the fleet policy may publish only to desired topics"
  }
}

run "buckets_are_private_versioned_and_encrypted" {
  command = apply
  module {
    source = "./modules/bucket"
  }
  variables {
    bucket       = "ember-datalake-123456789012-eu-west-1"
    kms_key      = "arn:aws:kms:eu-west-1:123456789012:key/k"
    ia_days      = 30
    glacier_days = 180
  }
  assert {
    condition     = aws_s3_bucket_public_access_block.this.block_public_acls && aws_s3_bucket_public_access_block.this.block_public_policy && aws_s3_bucket_public_access_block.this.ignore_public_acls && aws_s3_bucket_public_access_block.this.restrict_public_buckets
    error_message = "the bucket must block every form of public access"
  }
  assert {
    condition     = one(one(aws_s3_bucket_server_side_encryption_configuration.this.rule).apply_server_side_encryption_by_default).sse_algorithm == "aws:kms"
    error_message = "the bucket must use SSE-KMS"
  }
  assert {
    condition     = one(aws_s3_bucket_versioning.this.versioning_configuration).status == "Enabled"
    error_message = "the bucket must be versioned"
  }
  assert {
    condition     = jsondecode(aws_s3_bucket_policy.tls_only.policy).Statement[0].Effect == "Deny" && jsondecode(aws_s3_bucket_policy.tls_only.policy).Statement[0].Condition.Bool["aws:SecureTransport"] == "false"
    error_message = "the bucket must refuse plain HTTP"
  }
  assert {
    condition     = length(one(aws_s3_bucket_lifecycle_configuration.this.rule).transition) == 2
    error_message = "the data lake tiers to IA and Glacier IR"
  }
}

run "both_buckets_use_the_private_module" {
  command = apply
  assert {
    condition     = output.buckets.bundles != output.buckets.datalake && module.bundles_bucket.arn != null && module.datalake_bucket.arn != null
    error_message = "bundles and data lake are two buckets of modules/bucket"
  }
}

run "database_is_private_and_encrypted" {
  command = apply
  module {
    source = "./modules/database"
  }
  variables {
    name                  = "ember"
    vpc_id                = "vpc-1"
    subnet_ids            = ["subnet-a", "subnet-b"]
    client_security_group = "sg-nodes"
    kms_key               = "arn:aws:kms:eu-west-1:123456789012:key/k"
    instance_class        = "db.t4g.medium"
    allocated_gb          = 50
    multi_az              = true
    deletion_protection   = true
  }
  assert {
    condition     = aws_db_instance.this.publicly_accessible == false
    error_message = "RDS must not be publicly accessible"
  }
  assert {
    condition     = aws_db_instance.this.storage_encrypted && aws_db_instance.this.manage_master_user_password
    error_message = "RDS must be encrypted and keep its password out of the state"
  }
  assert {
    condition     = aws_vpc_security_group_ingress_rule.from_nodes.referenced_security_group_id == "sg-nodes" && aws_vpc_security_group_ingress_rule.from_nodes.cidr_ipv4 == null
    error_message = "only the EKS nodes' security group may reach PostgreSQL"
  }
}

run "fleet_role_is_least_privilege" {
  command = apply
  assert {
    condition = alltrue(flatten([
      for s in module.eks.fleet_policy.Statement : [
        for a in flatten([s.Action]) : !strcontains(a, "*")
      ]
    ]))
    error_message = "the fleet role must list its actions (no wildcards)"
  }
  assert {
    condition = alltrue(flatten([
      for s in module.eks.fleet_policy.Statement : [for r in flatten([s.Resource]) : r != "*"]
    ]))
    error_message = "the fleet role must name its resources"
  }
  assert {
    condition = toset(flatten([for s in module.eks.fleet_policy.Statement : flatten([s.Action])])) == toset([
      "kinesis:DescribeStreamSummary", "kinesis:ListShards", "kinesis:GetShardIterator", "kinesis:GetRecords",
      "s3:ListBucket", "s3:GetObject", "s3:PutObject", "s3:DeleteObject",
      "kms:Decrypt", "kms:GenerateDataKey", "iot:Publish", "iot:RetainPublish", "secretsmanager:GetSecretValue",
    ])
    error_message = "the fleet role's actions changed: read Kinesis, r/w the two buckets, publish desired state, read the DB secret"
  }
  assert {
    condition = toset(flatten([
      for s in module.eks.fleet_policy.Statement : flatten([s.Resource]) if startswith(s.Sid, "ReadIngest")
    ])) == toset(["arn:aws:kinesis:eu-west-1:123456789012:stream/ember-ingest"])
    error_message = "the fleet reads only the ingest stream"
  }
  assert {
    condition     = module.eks.fleet_trust_policy.Statement[0].Condition.StringEquals["oidc.eks.eu-west-1.amazonaws.com/id/EXAMPLE:sub"] == "system:serviceaccount:ember:ember-fleet"
    error_message = "only the fleet's service account may assume the fleet role"
  }
}

run "outputs_have_the_agent_profile_shape" {
  command = apply
  assert {
    condition     = output.agent_profile.profile == "aws-iot-core" && output.agent_profile.port == 8883 && output.agent_profile.alt_port == 443 && output.agent_profile.alpn == "x-amzn-mqtt-ca"
    error_message = "the agent profile names the aws-iot-core profile, ports 8883/443 and ALPN x-amzn-mqtt-ca"
  }
  assert {
    condition     = output.agent_profile.endpoint == "a1b2c3d4e5f6g7-ats.iot.eu-west-1.amazonaws.com" && output.agent_profile.sni == output.agent_profile.endpoint
    error_message = "endpoint and SNI are the ATS endpoint"
  }
  assert {
    condition     = keys(output.agent_profile.topics) == ["desired", "heartbeat", "inference", "status", "telemetry"] && alltrue([for t in values(output.agent_profile.topics) : startswith(t, "ember/v1/{device_id}/")])
    error_message = "the profile lists every Ember topic under ember/v1/{device_id}/"
  }
  assert {
    condition     = output.agent_profile.limits.max_payload_bytes == 131072 && output.agent_profile.limits.max_qos == 1
    error_message = "the profile carries IoT Core's payload and QoS limits"
  }
  assert {
    condition     = jsondecode(output.agent_profile_json).endpoint == output.agent_profile.endpoint
    error_message = "the JSON file form matches the profile"
  }
}

run "invalid_thing_names_are_refused" {
  command = plan
  variables {
    devices = { "dev.1" = "-----BEGIN CERTIFICATE REQUEST-----\nx\n-----END CERTIFICATE REQUEST-----\n" }
  }
  expect_failures = [var.devices]
}
