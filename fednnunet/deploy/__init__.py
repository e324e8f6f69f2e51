"""Deploy-time provisioning: credentials, permissions, broker definitions, buckets."""
