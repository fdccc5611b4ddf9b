output "endpoint" {
  description = "host:port of the PostgreSQL server."
  value       = aws_db_instance.this.endpoint
}

output "master_secret_arn" {
  description = "Secrets Manager secret holding the master user's password (managed by RDS)."
  value       = aws_db_instance.this.master_user_secret[0].secret_arn
}
