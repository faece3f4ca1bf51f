"""The MCP tests run against the paid-mode deployment of the attack suite (same fixture, this package's own
instance): real gateway with /mcp, payments actor on LiteSVM, tiny Llama."""

from tests.integration.attacks.conftest import paid  # noqa: F401 - the fixture, scoped to this package
