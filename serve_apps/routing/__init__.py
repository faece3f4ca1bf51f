"""Reputation-aware request routing: replicas report their providers' scores, the router prefers the best.

`ranking` is pure (unit-tested without Ray), `stats` is the replica side (what `record_routing_stats`
returns), `router` is the Ray Serve `RequestRouter` named in the deployment's `request_router_config`.
"""
