# Ember on AWS: agents on AWS IoT Core, the fleet on EKS reading Kinesis, PostgreSQL on RDS,
# model bundles and the data lake on S3. docs/deploy-aws.md has the picture; scripts/up.sh aws
# and scripts/down.sh aws drive this configuration.
#
#   modules/network   VPC, public/private subnets per zone, NAT, flow logs
#   modules/iot       thing type, things + certificates from CSRs, policies, topic rules, Kinesis
#   modules/bucket    one private S3 bucket (used twice: bundles, data lake)
#   modules/database  RDS PostgreSQL (private, encrypted, password in Secrets Manager)
#   modules/eks       EKS cluster, node group, OIDC provider, the fleet's IRSA role
#
# No private key and no password enters the state: device and fleet certificates are issued
# from CSRs, and RDS keeps its master password in Secrets Manager (manage_master_user_password).
provider "aws" {
  region = var.region
  default_tags {
    tags = merge({ "app.kubernetes.io/part-of" = "ember", "ember:deployment" = var.name }, var.tags)
  }
}

data "aws_caller_identity" "current" {}
data "aws_partition" "current" {}

# One customer-managed key for everything at rest (S3, Kinesis, RDS, EKS secrets, logs).
resource "aws_kms_key" "ember" {
  description             = "${var.name}: data at rest (S3, Kinesis, RDS, EKS secrets, logs)"
  enable_key_rotation     = true
  deletion_window_in_days = 30
  policy = jsonencode({
    Version = "2012-10-17"
    Statement = [
      {
        Sid       = "AccountAdministers"
        Effect    = "Allow"
        Principal = { AWS = "arn:${data.aws_partition.current.partition}:iam::${data.aws_caller_identity.current.account_id}:root" }
        Action    = "kms:*"
        Resource  = "*"
      },
      {
        Sid       = "CloudWatchLogsEncrypts"
        Effect    = "Allow"
        Principal = { Service = "logs.${var.region}.amazonaws.com" }
        Action    = ["kms:Encrypt*", "kms:Decrypt*", "kms:ReEncrypt*", "kms:GenerateDataKey*", "kms:Describe*"]
        Resource  = "*"
        Condition = {
          ArnLike = { "kms:EncryptionContext:aws:logs:arn" = "arn:${data.aws_partition.current.partition}:logs:${var.region}:${data.aws_caller_identity.current.account_id}:*" }
        }
      },
    ]
  })
}

resource "aws_kms_alias" "ember" {
  name          = "alias/${var.name}"
  target_key_id = aws_kms_key.ember.key_id
}

module "network" {
  source   = "./modules/network"
  name     = var.name
  cidr     = var.vpc_cidr
  az_count = var.az_count
  kms_key  = aws_kms_key.ember.arn
}

module "bundles_bucket" {
  source          = "./modules/bucket"
  bucket          = "${var.name}-bundles-${data.aws_caller_identity.current.account_id}-${var.region}"
  kms_key         = aws_kms_key.ember.arn
  noncurrent_days = 90
}

module "datalake_bucket" {
  source          = "./modules/bucket"
  bucket          = "${var.name}-datalake-${data.aws_caller_identity.current.account_id}-${var.region}"
  kms_key         = aws_kms_key.ember.arn
  ia_days         = var.datalake_ia_days
  glacier_days    = var.datalake_glacier_days
  noncurrent_days = 30
}

module "iot" {
  source          = "./modules/iot"
  name            = var.name
  devices         = var.devices
  fleet_csr       = var.fleet_csr
  kms_key         = aws_kms_key.ember.arn
  shards          = var.kinesis_shards
  retention_hours = var.kinesis_retention_hours
}

module "eks" {
  source              = "./modules/eks"
  name                = var.name
  kubernetes_version  = var.eks_version
  vpc_id              = module.network.vpc_id
  subnet_ids          = module.network.private_subnet_ids
  public_access_cidrs = var.eks_public_access_cidrs
  kms_key             = aws_kms_key.ember.arn
  node_instance_types = var.node_instance_types
  node_count          = var.node_count
  namespace           = var.k8s_namespace
  service_account     = var.k8s_service_account
  kinesis_stream_arn  = module.iot.stream_arn
  bucket_arns         = [module.bundles_bucket.arn, module.datalake_bucket.arn]
  db_secret_arn       = module.database.master_secret_arn
  desired_topic_arn   = module.iot.desired_topic_arn
}

module "database" {
  source                = "./modules/database"
  name                  = var.name
  vpc_id                = module.network.vpc_id
  subnet_ids            = module.network.private_subnet_ids
  client_security_group = module.eks.node_security_group_id
  kms_key               = aws_kms_key.ember.arn
  instance_class        = var.db_instance_class
  allocated_gb          = var.db_allocated_gb
  multi_az              = var.db_multi_az
  deletion_protection   = var.deletion_protection
}
