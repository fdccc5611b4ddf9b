# AWS IoT Core for Ember's agents: one thing per device (its certificate issued from the
# device's CSR, so the private key stays on the device), a device policy that confines each
# connection to its own `ember/v1/<thing>/...` topics, and topic rules that carry every agent
# message and the presence lifecycle events into one Kinesis stream the fleet reads.
#
# **Invariant:** the device id the fleet stores comes from the topic (`topic(3)`) or the MQTT
# client id (presence), both of which the device policy ties to the certificate's thing; the
# payload's own claim is never trusted (the fleet also checks it matches).
data "aws_caller_identity" "current" {}
data "aws_partition" "current" {}
data "aws_region" "current" {}

data "aws_iot_endpoint" "ats" {
  endpoint_type = "iot:Data-ATS"
}

locals {
  arn_prefix = "arn:${data.aws_partition.current.partition}:iot:${data.aws_region.current.name}:${data.aws_caller_identity.current.account_id}"
  # IoT policy variables are written $${...} so that Terraform leaves them to IoT Core.
  own_thing = "$${iot:Connection.Thing.ThingName}"
  # What an agent publishes (status is retained and is also the Last Will) and what it reads.
  uplink_channels = ["telemetry", "inference", "status", "heartbeat"]
  device_policy = {
    Version = "2012-10-17"
    Statement = [
      {
        Sid       = "ConnectAsOwnThing"
        Effect    = "Allow"
        Action    = "iot:Connect"
        Resource  = "${local.arn_prefix}:client/${local.own_thing}"
        Condition = { Bool = { "iot:Connection.Thing.IsAttached" = "true" } }
      },
      {
        Sid       = "PublishOwnTopics"
        Effect    = "Allow"
        Action    = ["iot:Publish", "iot:RetainPublish"]
        Resource  = [for c in local.uplink_channels : "${local.arn_prefix}:topic/ember/v1/${local.own_thing}/${c}"]
        Condition = { Bool = { "iot:Connection.Thing.IsAttached" = "true" } }
      },
      {
        Sid       = "SubscribeOwnDesiredState"
        Effect    = "Allow"
        Action    = "iot:Subscribe"
        Resource  = "${local.arn_prefix}:topicfilter/ember/v1/${local.own_thing}/desired"
        Condition = { Bool = { "iot:Connection.Thing.IsAttached" = "true" } }
      },
      {
        Sid       = "ReceiveOwnDesiredState"
        Effect    = "Allow"
        Action    = "iot:Receive"
        Resource  = "${local.arn_prefix}:topic/ember/v1/${local.own_thing}/desired"
        Condition = { Bool = { "iot:Connection.Thing.IsAttached" = "true" } }
      },
    ]
  }
  # The fleet's MQTT identity (optional): publishes the retained desired state of any device.
  fleet_policy = {
    Version = "2012-10-17"
    Statement = [
      {
        Sid      = "ConnectAsFleetReplica"
        Effect   = "Allow"
        Action   = "iot:Connect"
        Resource = "${local.arn_prefix}:client/${var.name}-fleet-*"
      },
      {
        Sid      = "PublishDesiredState"
        Effect   = "Allow"
        Action   = ["iot:Publish", "iot:RetainPublish"]
        Resource = "${local.arn_prefix}:topic/ember/v1/*/desired"
      },
    ]
  }
}

resource "aws_iot_thing_type" "device" {
  name = "${var.name}-agent"
  properties {
    description = "A device running ember-agent; the thing name is its Ember device id."
  }
}

resource "aws_iot_thing" "device" {
  for_each        = var.devices
  name            = each.key
  thing_type_name = aws_iot_thing_type.device.name
}

# Issued from the device's CSR: the state holds the certificate (public), never a key.
resource "aws_iot_certificate" "device" {
  for_each = var.devices
  csr      = each.value
  active   = true
}

resource "aws_iot_thing_principal_attachment" "device" {
  for_each  = var.devices
  thing     = aws_iot_thing.device[each.key].name
  principal = aws_iot_certificate.device[each.key].arn
}

resource "aws_iot_policy" "device" {
  name   = "${var.name}-device"
  policy = jsonencode(local.device_policy)
}

resource "aws_iot_policy_attachment" "device" {
  for_each = var.devices
  policy   = aws_iot_policy.device.name
  target   = aws_iot_certificate.device[each.key].arn
}

resource "aws_iot_policy" "fleet" {
  name   = "${var.name}-fleet"
  policy = jsonencode(local.fleet_policy)
}

resource "aws_iot_certificate" "fleet" {
  count  = var.fleet_csr == "" ? 0 : 1
  csr    = var.fleet_csr
  active = true
}

resource "aws_iot_policy_attachment" "fleet" {
  count  = var.fleet_csr == "" ? 0 : 1
  policy = aws_iot_policy.fleet.name
  target = aws_iot_certificate.fleet[0].arn
}

# The ingest stream: partition key = device id, so one device's messages stay in order.
resource "aws_kinesis_stream" "ingest" {
  name             = "${var.name}-ingest"
  shard_count      = var.shards
  retention_period = var.retention_hours
  encryption_type  = "KMS"
  kms_key_id       = var.kms_key
  stream_mode_details {
    stream_mode = "PROVISIONED"
  }
}

# Messages a rule could not deliver (throttling, a key problem): kept for investigation.
resource "aws_cloudwatch_log_group" "rule_errors" {
  name              = "/${var.name}/iot-rule-errors"
  retention_in_days = 365
  kms_key_id        = var.kms_key
}

resource "aws_iam_role" "rules" {
  name = "${var.name}-iot-rules"
  assume_role_policy = jsonencode({
    Version = "2012-10-17"
    Statement = [{
      Effect    = "Allow"
      Principal = { Service = "iot.amazonaws.com" }
      Action    = "sts:AssumeRole"
      Condition = { StringEquals = { "aws:SourceAccount" = data.aws_caller_identity.current.account_id } }
    }]
  })
}

resource "aws_iam_role_policy" "rules" {
  name = "put-ingest-and-errors"
  role = aws_iam_role.rules.id
  policy = jsonencode({
    Version = "2012-10-17"
    Statement = [
      {
        Sid      = "PutIngest"
        Effect   = "Allow"
        Action   = ["kinesis:PutRecord"]
        Resource = aws_kinesis_stream.ingest.arn
      },
      {
        Sid      = "EncryptIngest"
        Effect   = "Allow"
        Action   = ["kms:GenerateDataKey"]
        Resource = var.kms_key
      },
      {
        Sid      = "LogErrors"
        Effect   = "Allow"
        Action   = ["logs:CreateLogStream", "logs:PutLogEvents"]
        Resource = "${aws_cloudwatch_log_group.rule_errors.arn}:*"
      },
    ]
  })
}

# Agent messages -> Kinesis. The record is JSON written by the rule, not by the device:
# {"device": topic(3), "channel": topic(4), "payload": base64 of the raw MQTT payload (JSON or
# CBOR survive unchanged), "received_ms": IoT Core's timestamp}.
resource "aws_iot_topic_rule" "ingest" {
  name        = replace("${var.name}_ingest", "-", "_")
  description = "Ember agent messages to the ingest stream"
  enabled     = true
  sql         = "SELECT encode(*, 'base64') AS payload, topic(3) AS device, topic(4) AS channel, timestamp() AS received_ms FROM 'ember/v1/+/+' WHERE topic(4) = 'telemetry' OR topic(4) = 'inference' OR topic(4) = 'status' OR topic(4) = 'heartbeat'"
  sql_version = "2016-03-23"

  kinesis {
    role_arn      = aws_iam_role.rules.arn
    stream_name   = aws_kinesis_stream.ingest.name
    partition_key = "$${topic(3)}"
  }

  error_action {
    cloudwatch_logs {
      log_group_name = aws_cloudwatch_log_group.rule_errors.name
      role_arn       = aws_iam_role.rules.arn
    }
  }
}

# Presence: IoT Core's lifecycle events ($aws/events/presence/connected|disconnected/<client
# id>); the client id is the thing name (device policy), so it is the trusted device id.
resource "aws_iot_topic_rule" "presence" {
  name        = replace("${var.name}_presence", "-", "_")
  description = "Ember agent connect/disconnect events to the ingest stream"
  enabled     = true
  sql         = "SELECT encode(*, 'base64') AS payload, clientId AS device, 'presence' AS channel, timestamp() AS received_ms FROM '$aws/events/presence/+/+'"
  sql_version = "2016-03-23"

  kinesis {
    role_arn      = aws_iam_role.rules.arn
    stream_name   = aws_kinesis_stream.ingest.name
    partition_key = "$${clientId}"
  }

  error_action {
    cloudwatch_logs {
      log_group_name = aws_cloudwatch_log_group.rule_errors.name
      role_arn       = aws_iam_role.rules.arn
    }
  }
}
