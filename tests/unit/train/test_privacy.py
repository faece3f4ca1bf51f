"""DP-SGD accounting: epsilon is cumulative across rounds and restorable from client state."""

from pathlib import Path

from train_jobs.config import DataSpec, LoraSpec, OptimSpec, PrivacySpec
from train_jobs.data import load_examples
from train_jobs.privacy import AccountantState, epsilon
from train_jobs.task import add_lora, load_model, train

_PRIVACY = PrivacySpec(enabled=True, noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-5)


def test_epsilon_grows_with_steps_and_shrinks_with_noise() -> None:
    assert epsilon([], 1e-5) == 0.0
    few, many = epsilon([(1.0, 0.1, 10)], 1e-5), epsilon([(1.0, 0.1, 20)], 1e-5)
    assert 0 < few < many
    assert epsilon([(2.0, 0.1, 20)], 1e-5) < many


def test_accountant_state_round_trip() -> None:
    state = AccountantState.from_history([(1.0, 0.1, 3), (0.5, 0.2, 4)])
    assert state.history() == [(1.0, 0.1, 3), (0.5, 0.2, 4)] and state.total_steps() == 7


def test_dp_training_accumulates_epsilon_across_rounds(tiny_dir: Path) -> None:
    model, tokenizer = load_model(tiny_dir)
    model = add_lora(model, LoraSpec(r=4, target_modules=["q_proj", "v_proj"]))
    train_set, _ = load_examples(DataSpec(max_length=16, max_examples=40), tokenizer)
    optim = OptimSpec(learning_rate=1e-2, batch_size=4, max_steps=3)
    first = train(model, train_set, optim, privacy=_PRIVACY)
    second = train(model, train_set, optim, privacy=_PRIVACY, accountant=first.accountant)
    assert first.accountant is not None and second.accountant is not None
    assert second.accountant.total_steps() == 6
    assert first.epsilon is not None and second.epsilon is not None
    assert second.epsilon > first.epsilon > 0
    # This round's epsilon alone equals round 1's (same steps and noise); the total is larger.
    assert abs((second.round_epsilon or 0) - first.epsilon) < 1e-9
    sample_rate = first.accountant.sample_rates[0]
    assert abs(second.epsilon - epsilon([(1.0, sample_rate, 6)], 1e-5)) < 1e-9


def test_the_budget_refuses_a_round_that_would_pass_it_and_central_dp_grows_with_rounds() -> None:
    import math

    import pytest

    from train_jobs.config import PrivacySpec, ServerDPSpec
    from train_jobs.privacy import (
        AccountantState,
        PrivacyBudgetExceeded,
        central_epsilon,
        check_budget,
        poisson_sample_rate,
        projected_epsilon,
    )

    spec = PrivacySpec(enabled=True, noise_multiplier=0.8, max_epsilon=8.0)
    rate = poisson_sample_rate(40, 8)
    assert rate == 0.2
    one = projected_epsilon(None, spec, rate, 3)
    spent = AccountantState([0.8], [rate], [3])
    assert projected_epsilon(spent, spec, rate, 3) > one > 0
    check_budget(None, spec, rate, 3)  # one round fits
    with pytest.raises(PrivacyBudgetExceeded):
        check_budget(AccountantState([0.8], [rate], [300]), spec, rate, 3)
    check_budget(AccountantState([0.8], [rate], [300]), PrivacySpec(enabled=True), rate, 3)  # no budget
    server = ServerDPSpec(enabled=True, noise_multiplier=1.0)
    assert central_epsilon(server, 2, 1e-5) > central_epsilon(server, 1, 1e-5) > 0
    assert central_epsilon(ServerDPSpec(enabled=True, noise_multiplier=0.0), 1, 1e-5) == math.inf
