"""SolanaLM payments: metering, a double-entry ledger, wallet sign-in and Solana settlement.

Other packages use only `payments.protocol` (typed messages), `payments.client` (the actor) and
`payments.http` (routes to mount).
"""
