"""The provider network: wallet-proved joining, the node registry, reputation, and stage placement.

Modules: `wallet` (challenge/response), `records` (typed records), `reputation` (update rule, routing
score), `registry` (pure registry + Ray actor), `placement` (pure planner), `model_cost` (meta-device
layer sizes), `join` and `cli` (`solanalm node ...`). See docs/network.md.
"""
