"""The paid demo's settings: configs/serve.yaml in paid mode, valid, with its own ledger and payee."""

from pathlib import Path

from solanalm_client import load_keypair
from solders.keypair import Keypair

from cluster.deploy import read_serve_config, settings_for
from payments.demo import DEMO_PRICE, demo_overrides, write_keypair_file


def test_the_demo_deploys_the_default_config_in_paid_mode(repo_root: Path, tmp_path: Path) -> None:
    provider = str(Keypair().pubkey())
    settings = settings_for(
        read_serve_config(repo_root / "configs" / "serve.yaml"), demo_overrides(tmp_path / "payments", provider, 18000)
    )
    payments = settings.payments
    assert payments.enabled and not payments.open_mode and payments.chain_backend == "litesvm"
    assert payments.operator_wallet == provider and payments.state_dir == tmp_path / "payments"
    assert payments.price_for(settings.model.served[0]).prompt_per_1k == DEMO_PRICE["prompt_per_1k"]
    assert settings.http.port == 18000


def test_the_demo_writes_keypair_files_the_sdk_and_solana_cli_read(tmp_path: Path) -> None:
    keypair = Keypair()
    path = write_keypair_file(keypair, tmp_path / "w" / "id.json")
    assert load_keypair(path).pubkey() == keypair.pubkey() and path.stat().st_mode & 0o077 == 0
