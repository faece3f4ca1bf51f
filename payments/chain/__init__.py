"""Chain backends (LiteSVM in-process, JSON-RPC) and Solana transaction building."""
