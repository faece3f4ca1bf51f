"""Trust-domain plumbing: certificates for TLS links and Ray's TLS, Ray's token authentication."""
