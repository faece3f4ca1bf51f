"""Stage-host fixtures: the tiny Llama checkpoint (as tests/unit/serve builds it), a TLS identity, servers."""

import secrets
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

from cluster.models.tiny import tiny_llama_config
from cluster.security.certs import CertKey, self_signed
from serve_apps.stagehost.server import HostLimits, StageHostServer

TINY_VOCAB = 512
TINY_LAYERS = 6
TINY_HIDDEN = 64
HOST = "127.0.0.1"


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config(vocab_size=TINY_VOCAB, num_layers=TINY_LAYERS)).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def other_tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Same shape, other weights (a provider that swapped its model)."""
    path = tmp_path_factory.mktemp("tiny-llama-other")
    torch.manual_seed(7)
    LlamaForCausalLM(tiny_llama_config(vocab_size=TINY_VOCAB, num_layers=TINY_LAYERS)).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def cert() -> CertKey:
    return self_signed([HOST])


@pytest.fixture
def token() -> str:
    return secrets.token_urlsafe(32)


@pytest.fixture
def start_host(tiny_dir: Path, cert: CertKey, token: str) -> Iterator[Callable[..., StageHostServer]]:
    """Start stage hosts on ephemeral ports of 127.0.0.1 serving model 'tiny'; all stopped after the test."""
    servers: list[StageHostServer] = []

    def start(model_dir: Path | None = None, limits: HostLimits | None = None) -> StageHostServer:
        server = StageHostServer({"tiny": model_dir or tiny_dir}, cert, token, host=HOST, port=0, limits=limits)
        server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop(0)
