"""`solanalm node join/leave`: labels and command lines, checked without starting Ray."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cluster.config.network import NetworkSection
from cluster.network import join as joining
from cluster.network.cli import app


def test_node_labels_carry_wallet_region_hardware_and_token() -> None:
    labels = joining.node_labels("solanalm.io", "WalLet1", "tok", "eu-west", "gpu", {"team.io/rack": "r7"})
    assert labels == {
        "solanalm.io/wallet": "WalLet1",
        "solanalm.io/hardware": "gpu",
        "solanalm.io/join": "tok",
        "solanalm.io/region": "eu-west",
        "team.io/rack": "r7",
    }
    with pytest.raises(joining.JoinError, match="invalid node label"):
        joining.node_labels("solanalm.io", "w", "tok", region="eu west")
    with pytest.raises(joining.JoinError, match="invalid node label"):
        joining.node_labels("solanalm.io", "w", "tok", extra={"ray.io/node-id": "x"})


def test_ray_start_command_line() -> None:
    command = joining.ray_start_command(
        "10.0.0.1:6379", {"a.io/w": "x", "a.io/r": "eu"}, num_cpus=2, resources={"solanalm_stage": 4}, block=True
    )
    assert command[1:] == [
        "start",
        "--address=10.0.0.1:6379",
        "--disable-usage-stats",
        "--labels=a.io/w=x,a.io/r=eu",
        "--num-cpus=2",
        '--resources={"solanalm_stage": 4}',
        "--block",
    ]
    assert joining.ray_stop_command()[1:] == ["stop"]


def test_wait_for_drain_polls_until_stages_are_gone() -> None:
    remaining = [["stage:m:r:0:0-3"], ["stage:m:r:0:0-3"], []]
    assert joining.wait_for_drain("n1", timeout_s=5, stages_on=lambda _: remaining.pop(0), poll_s=0)
    assert not joining.wait_for_drain("n1", timeout_s=0, stages_on=lambda _: ["stage:x"], poll_s=0)


def test_state_file_round_trip(tmp_path: Path) -> None:
    node = joining.JoinedNode("n1", "h:6379", "W")
    joining.write_state(tmp_path / "s" / "node.json", node)
    assert joining.read_state(tmp_path / "s" / "node.json") == node
    with pytest.raises(joining.JoinError, match="no joined node"):
        joining.read_state(tmp_path / "missing.json")


def test_join_with_a_bad_keypair_runs_nothing(tmp_path: Path) -> None:
    ran: list[list[str]] = []
    (tmp_path / "id.json").write_text(json.dumps([0] * 10))
    with pytest.raises(Exception, match="not a Solana keypair"):
        joining.join("h:6379", tmp_path / "id.json", NetworkSection(), "ns", runner=ran.append)
    assert ran == []
    result = CliRunner().invoke(app, ["join", "--address", "h:6379", "--wallet", str(tmp_path / "id.json")])
    assert result.exit_code == 1 and "join failed" in result.output


def test_network_section_bounds() -> None:
    section = NetworkSection.model_validate({"verification_fraction": 0.1, "routing": {"reputation": 3.0}})
    assert section.routing.reputation == 3.0 and section.placement.node_label_key == "ray.io/node-id"
    with pytest.raises(ValueError):
        NetworkSection(verification_fraction=1.5)
    with pytest.raises(ValueError):
        NetworkSection.model_validate({"reputation": {"typo": 1}})
