"""The MCP server of SolanaLM: inference, training and data-sharding tools and network/training resources.

`server.build_mcp_server(gateway, jobs)` is one `MCPServer` for both transports: stdio (`solanalm mcp`,
talking to a gateway over HTTP with an API key) and streamable HTTP mounted on the gateway at /mcp.
"""
