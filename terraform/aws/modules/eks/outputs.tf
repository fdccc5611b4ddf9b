output "cluster_name" {
  description = "The EKS cluster."
  value       = aws_eks_cluster.this.name
}

output "cluster_endpoint" {
  description = "The Kubernetes API endpoint."
  value       = aws_eks_cluster.this.endpoint
}

output "node_security_group_id" {
  description = "The cluster security group the managed nodes use (the database admits it)."
  value       = aws_eks_cluster.this.vpc_config[0].cluster_security_group_id
}

output "fleet_role_arn" {
  description = "The fleet's IRSA role (eks.amazonaws.com/role-arn on the service account)."
  value       = aws_iam_role.fleet.arn
}

output "fleet_policy" {
  description = "The fleet role's permissions (decoded), for tests and review."
  value       = local.fleet_policy
}

output "fleet_trust_policy" {
  description = "The fleet role's trust policy (decoded)."
  value       = jsondecode(aws_iam_role.fleet.assume_role_policy)
}
