"""Verification of served traffic: the coordinator keeps commitments of a secretly sampled fraction of the
sequences its provider stages serve, and an auditor on the head re-executes them from reference weights.
See docs/security.md, "Verification on served traffic".

`commitments` (top-k commitments, tolerances) and `audit` (what is kept, re-execution, the verdict) are
pure; `trace` is the cache-free stage forward (torch); `auditor` is the Ray actor that runs the jobs and
reports verdicts to the registry and payments.
"""
