"""DP-SGD with Opacus and an accountant that survives across rounds.

A Flower ClientApp is rebuilt for every message, so the privacy accountant is serialised into the
client's persistent state after each round and restored before the next: epsilon is cumulative over
all rounds a client took part in, never re-started at zero.
"""

from dataclasses import dataclass, field
from typing import Any

import torch
from opacus import PrivacyEngine
from opacus.accountants import RDPAccountant

from train_jobs.config import PrivacySpec

# (noise_multiplier, sample_rate, num_steps) per run of identical steps, as Opacus' RDP keeps it.
HistoryEntry = tuple[float, float, int]


@dataclass
class AccountantState:
    """The RDP accountant's history in a form that fits a Flower ConfigRecord or JSON."""

    noise_multipliers: list[float] = field(default_factory=list)
    sample_rates: list[float] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)

    @classmethod
    def from_history(cls, history: list[HistoryEntry]) -> "AccountantState":
        return cls(
            [float(h[0]) for h in history],
            [float(h[1]) for h in history],
            [int(h[2]) for h in history],
        )

    def history(self) -> list[HistoryEntry]:
        return list(zip(self.noise_multipliers, self.sample_rates, self.steps, strict=True))

    def total_steps(self) -> int:
        return sum(self.steps)


def epsilon(history: list[HistoryEntry], delta: float) -> float:
    """Epsilon at `delta` spent by the DP-SGD steps in `history` (0 for no steps)."""
    if not history:
        return 0.0
    accountant = RDPAccountant()
    accountant.history = list(history)
    return float(accountant.get_epsilon(delta=delta))


@dataclass
class PrivateTraining:
    """Model, optimizer and loader made private, plus the engine whose accountant tracks them."""

    module: torch.nn.Module
    optimizer: Any
    loader: torch.utils.data.DataLoader
    engine: PrivacyEngine
    sample_rate: float

    def account_skipped_step(self, noise_multiplier: float) -> None:
        """An empty Poisson batch is still a sampling step: count it, not to understate epsilon."""
        self.engine.accountant.step(noise_multiplier=noise_multiplier, sample_rate=self.sample_rate)

    def state(self) -> AccountantState:
        return AccountantState.from_history(list(self.engine.accountant.history))


def make_private(
    module: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: torch.utils.data.DataLoader,
    spec: PrivacySpec,
    previous: AccountantState | None = None,
) -> PrivateTraining:
    """Wrap for DP-SGD (Poisson sampling, per-example clipping, noise); resume `previous`."""
    engine = PrivacyEngine(accountant="rdp")
    if previous is not None:
        engine.accountant.history = previous.history()
    private_module, private_optimizer, private_loader = engine.make_private(
        module=module,
        optimizer=optimizer,
        data_loader=loader,
        noise_multiplier=spec.noise_multiplier,
        max_grad_norm=spec.max_grad_norm,
        poisson_sampling=True,
    )
    sample_rate = float(getattr(private_loader, "sample_rate", 1 / len(loader)))
    return PrivateTraining(private_module, private_optimizer, private_loader, engine, sample_rate)
