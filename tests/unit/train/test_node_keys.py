"""SuperNode auth keys bound to proven wallets, and the ServerApp's check of a node's wallet against it."""

import stat
from pathlib import Path

import pytest
from solders.keypair import Keypair

from cluster.network.wallet import ProofError
from train_jobs.config import FederatedJob
from train_jobs.fl_deploy import run_config, supernode_command
from train_jobs.fl_server import Registration, bind_to_key
from train_jobs.node_keys import (
    NodeKeyBinding,
    bind_node_key,
    ensure_node_key,
    read_node_wallets,
    verify_binding,
    write_node_wallet,
)


def test_node_key_is_made_once_private_and_ec(tmp_path: Path) -> None:
    private, public = ensure_node_key(tmp_path / "state")
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert public.read_text().startswith("ecdsa-sha2-nistp384 ")
    assert ensure_node_key(tmp_path / "state") == (private, public)
    assert public.read_text() == ensure_node_key(tmp_path / "state")[1].read_text()


def test_binding_verifies_only_for_a_proven_wallet_and_its_own_key(tmp_path: Path) -> None:
    keypair = Keypair()
    _, public = ensure_node_key(tmp_path)
    binding = bind_node_key(keypair, public.read_text())
    wallet = str(keypair.pubkey())
    assert verify_binding(NodeKeyBinding.from_json(binding.to_json()), {wallet}.__contains__) == wallet
    with pytest.raises(ProofError, match="not proven"):
        verify_binding(binding, set().__contains__)
    _, other = ensure_node_key(tmp_path / "other")
    swapped = NodeKeyBinding(binding.wallet, other.read_text().strip(), binding.signature)
    with pytest.raises(ProofError, match="does not verify"):
        verify_binding(swapped, {wallet}.__contains__)
    forged = NodeKeyBinding(str(Keypair().pubkey()), binding.public_key, binding.signature)
    with pytest.raises(ProofError, match="does not verify"):
        verify_binding(forged, {forged.wallet}.__contains__)
    with pytest.raises(ProofError, match="not an OpenSSH"):
        verify_binding(NodeKeyBinding(wallet, "ssh-rsa nonsense", binding.signature), {wallet}.__contains__)
    with pytest.raises(ProofError):
        NodeKeyBinding.from_json('{"wallet": 1}')


def test_node_wallets_file_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "node-wallets.json"
    assert read_node_wallets(path) == {}
    write_node_wallet(path, 12345678901234567890, "A")
    write_node_wallet(path, 7, "B")
    assert read_node_wallets(path) == {12345678901234567890: "A", 7: "B"}


def test_a_node_is_paid_only_to_the_wallet_its_key_is_bound_to() -> None:
    proven = Registration(node_id=7, partition=0, wallet="W", claimed_wallet="W")
    assert bind_to_key(proven, None) == proven  # simulation: no keys
    assert bind_to_key(proven, {7: "W"}) == proven
    other = bind_to_key(proven, {7: "V"})
    assert other.wallet is None and other.claimed_wallet == "W" and "bound" in (other.unproven_reason or "")
    assert bind_to_key(proven, {}).unproven_reason == "node key not bound"


def test_supernode_command_and_run_config(tmp_path: Path) -> None:
    command = supernode_command("link:9092", tmp_path / "ca.pem", tmp_path / "k", tmp_path / "d", tmp_path / "w", 9500)
    assert "--insecure" not in command
    assert command[command.index("--root-certificates") + 1] == str(tmp_path / "ca.pem")
    assert f'data-dir="{tmp_path / "d"}"' in command[command.index("--node-config") + 1]
    job = FederatedJob(name="j", num_clients=2)
    config = run_config(job, tmp_path, tmp_path / "node-wallets.json")
    sent = FederatedJob.model_validate_json(config["job-json"])
    assert (sent.name, sent.num_clients, sent.model.catalogue) == ("j", 2, job.model.catalogue.resolve())
    assert config["node-wallets"].endswith("node-wallets.json")


def test_provider_train_bind_only_writes_a_binding_the_operator_verifies(tmp_path: Path) -> None:
    import typer
    from typer.testing import CliRunner

    from cluster.network.wallet import write_keypair
    from train_jobs.provider_cli import BINDING_FILE, train_command

    app = typer.Typer()
    app.command("train")(train_command)
    app.command("other")(lambda: None)  # two commands: typer keeps the `train` name
    keypair = Keypair()
    wallet = write_keypair(keypair, tmp_path / "wallet.json")
    (tmp_path / "data").mkdir()
    args = ["train", "--superlink", "h:9092", "--wallet", str(wallet), "--data", str(tmp_path / "data")]
    args += ["--ca-cert", str(tmp_path / "ca.pem"), "--state-dir", str(tmp_path / "state"), "--bind-only"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    binding = NodeKeyBinding.from_json((tmp_path / "state" / BINDING_FILE).read_text())
    assert verify_binding(binding, {str(keypair.pubkey())}.__contains__) == str(keypair.pubkey())
    missing = CliRunner().invoke(app, [*args[:5], "--data", str(tmp_path / "nope"), *args[7:]])
    assert missing.exit_code == 1
