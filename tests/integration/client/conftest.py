"""A paid-mode deployment for the SDK tests: the money-path fixture's code (tests/integration/attacks), with
the operator's stage paying a provider wallet the tests hold, so receipts carry a provider share and a
settlement pass pays it on chain."""

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from ray import serve
from solders.keypair import Keypair

from cluster.deploy import deploy, read_serve_config, settings_for
from tests.integration.attacks.conftest import (
    COMPLETION_PER_1K,
    MODEL,
    PROMPT_PER_1K,
    RATE_LIMITS,
    PaidApp,
    _free_port,
)


@dataclass(frozen=True)
class SdkDeployment:
    app: PaidApp
    provider: Keypair  # the wallet the operator's stage pays (payments.operator_wallet)

    @property
    def url(self) -> str:
        return self.app.base_url


@pytest.fixture(scope="package")
def sdk_paid(
    ray_cluster: None, repo_root: Path, model_cache_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SdkDeployment]:
    provider = Keypair()
    app = read_serve_config(repo_root / "configs" / "serve.yaml")
    settings = settings_for(
        app,
        {
            "model": {
                "served": [MODEL],
                "cache_dir": str(model_cache_dir),
                "catalogue": str(repo_root / "configs" / "models.yaml"),
            },
            "pipeline": {"num_stages": 1, "max_num_seqs": 8, "max_queue": 32},
            "http": {"port": _free_port(), "rate_limits": RATE_LIMITS},
            "payments": {
                "enabled": True,
                "open_mode": False,
                "siws_allow_local_domain": True,  # a local test deployment: the default localhost domain
                "state_dir": str(tmp_path_factory.mktemp("sdk-payments")),
                "actor_name": f"solanalm-payments-sdk-{uuid.uuid4().hex[:6]}",
                "default_price": {"prompt_per_1k": PROMPT_PER_1K, "completion_per_1k": COMPLETION_PER_1K},
                "operator_wallet": str(provider.pubkey()),
                "settle_interval_s": 3600,  # tests settle explicitly
            },
        },
    )
    deploy(app, settings)
    yield SdkDeployment(PaidApp(f"http://127.0.0.1:{settings.http.port}/v1", settings), provider)
    serve.shutdown()
