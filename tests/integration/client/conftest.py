"""A paid-mode deployment for the SDK tests: the money-path fixture's code (tests/integration/attacks), with
the operator's stage paying a provider wallet the tests hold, so receipts carry a provider share and a
settlement pass pays it on chain."""

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from ray import serve
from solders.keypair import Keypair

from tests.integration.attacks.conftest import PaidApp, deploy_paid


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
    state_dir = tmp_path_factory.mktemp("sdk-payments")
    yield SdkDeployment(
        deploy_paid(repo_root, model_cache_dir, state_dir, operator_wallet=str(provider.pubkey())), provider
    )
    serve.shutdown()
