"""Importing SolanaLM's cluster code turns nothing on: the integration fixture's Ray stays without auth."""

import os
import subprocess
import sys

RAY_VARS = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_USE_TLS")
PROBE = """
import os
import cluster.cli, cluster.ray_cluster, cluster.security.ray_auth, cluster.security.ray_tls
from ray._raylet import AuthenticationMode, get_authentication_mode
print([k for k in os.environ if k in {vars}], get_authentication_mode() == AuthenticationMode.DISABLED)
"""


def test_importing_the_cli_sets_no_ray_variable() -> None:
    env = {k: v for k, v in os.environ.items() if k not in RAY_VARS}
    code = PROBE.format(vars=set(RAY_VARS))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip().splitlines()[-1] == "[] True", out.stderr[-2000:]
