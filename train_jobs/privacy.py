"""DP-SGD with Opacus and an accountant that survives across rounds.

A Flower ClientApp is rebuilt for every message, so the privacy accountant is serialised into the
client's persistent state after each round and restored before the next: epsilon is cumulative over
all rounds a client took part in, never re-started at zero.
"""

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from opacus import PrivacyEngine
from opacus.accountants import RDPAccountant

from train_jobs.config import PrivacySpec, ServerDPSpec

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


class PrivacyBudgetExceeded(RuntimeError):
    """A round would take a client past its epsilon budget (`PrivacySpec.max_epsilon`)."""


def poisson_sample_rate(examples: int, batch_size: int) -> float:
    """The sample rate Opacus' Poisson loader uses for `examples` in batches of `batch_size`."""
    return 1.0 / max(math.ceil(examples / batch_size), 1)


def projected_epsilon(previous: AccountantState | None, spec: PrivacySpec, sample_rate: float, steps: int) -> float:
    """Epsilon a client would have spent after `steps` more DP-SGD steps at `sample_rate`."""
    history = (previous.history() if previous is not None else []) + [(spec.noise_multiplier, sample_rate, steps)]
    return epsilon(history, spec.delta)


def check_budget(previous: AccountantState | None, spec: PrivacySpec, sample_rate: float, steps: int) -> None:
    """PrivacyBudgetExceeded when the next round would take the client past `spec.max_epsilon`."""
    if not spec.enabled or spec.max_epsilon is None:
        return
    projected = projected_epsilon(previous, spec, sample_rate, steps)
    if projected > spec.max_epsilon:
        raise PrivacyBudgetExceeded(f"this round would spend epsilon to {projected:.3f} > budget {spec.max_epsilon}")


def central_epsilon(spec: ServerDPSpec, rounds: int, delta: float) -> float:
    """Client-level epsilon of server-side fixed-clipping DP after `rounds` releases (RDP of the Gaussian
    mechanism, noise `noise_multiplier` x the clipping norm on the sum). No amplification by sampling is
    claimed, as Flower's own accountant for this wrapper does not: the server chooses who takes part."""
    if spec.noise_multiplier == 0:
        return math.inf
    return epsilon([(spec.noise_multiplier, 1.0, rounds)], delta)


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
