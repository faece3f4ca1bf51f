"""Proxy backend: a replica that forwards requests to an external API and earns a commission."""
