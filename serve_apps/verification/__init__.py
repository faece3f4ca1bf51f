"""Spot-check verification: re-execute a sampled request on a different pipeline and compare per-stage
activation fingerprints (cf. TOPLOC); a referee recomputes the first disagreeing stage from reference
weights to say which pipeline's stage is wrong. See docs/network.md, "Verification".

`fingerprint`, `judge` are pure; `trace` is the cache-free stage forward (torch); `tracing` runs on the
replica; `referee` recomputes one stage; `verifier` is the gateway's background orchestrator.
"""
