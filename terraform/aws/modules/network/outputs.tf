output "vpc_id" {
  description = "The VPC."
  value       = aws_vpc.this.id
}

output "private_subnet_ids" {
  description = "Private subnets (EKS nodes, RDS), one per zone."
  value       = aws_subnet.private[*].id
}

output "public_subnet_ids" {
  description = "Public subnets (NAT, internet-facing load balancers), one per zone."
  value       = aws_subnet.public[*].id
}
