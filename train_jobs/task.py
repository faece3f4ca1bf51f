"""Model, loss, training and evaluation: pure PyTorch/transformers, no Ray and no Flower.

The Ray Train loop and the Flower ClientApp both call these functions, so the unit tests of this
module cover the arithmetic of every job.
"""

import logging
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from train_jobs.config import LoraSpec, ModelRef, OptimSpec, PrivacySpec
from train_jobs.data import TokenizedSet
from train_jobs.privacy import AccountantState, epsilon, make_private

logger = logging.getLogger(__name__)


def base_model_dir(ref: ModelRef) -> Path:
    """Local Hugging Face directory of the catalogue model (materialised once, then cached)."""
    from cluster.models import load_catalogue, materialize

    spec = load_catalogue(ref.catalogue).get(ref.name)
    return materialize(spec, ref.cache_dir, dtype="float32")


def load_model(model_dir: Path) -> tuple[Any, Any]:
    """(float32 causal LM, tokenizer) from a local HF directory; the tokenizer pads with EOS."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return model, tokenizer


def add_lora(model: Any, spec: LoraSpec, seed: int = 0) -> Any:
    """Wrap `model` with trainable LoRA adapters (base frozen); seeded so all clients agree."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=list(spec.target_modules),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The tensors that training changes (LoRA adapters, or every parameter of a full fine-tune)."""
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy `state` (from `trainable_state` of an identically built model) into `model`."""
    params = dict(model.named_parameters())
    missing = [name for name in state if name not in params]
    if missing:
        raise KeyError(f"unknown parameters in state: {missing[:3]}")
    with torch.no_grad():
        for name, tensor in state.items():
            params[name].copy_(tensor)


def causal_lm_loss(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy, averaged over each example's real tokens, then over the batch.

    Per-example means (not one mean over all tokens) keep each example's weight equal, which is what
    Opacus' per-sample clipping with loss_reduction="mean" assumes.
    """
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]
    targets = input_ids[:, 1:]
    mask = attention_mask[:, 1:].to(logits.dtype)
    per_token = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    per_token = per_token.view(targets.shape) * mask
    per_example = per_token.sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
    return per_example.mean()


@torch.no_grad()
def evaluate(model: Any, data: TokenizedSet, batch_size: int = 32) -> float:
    """Mean held-out loss per example."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(data), batch_size):
        ids = data.input_ids[start : start + batch_size]
        mask = data.attention_mask[start : start + batch_size]
        total += float(causal_lm_loss(model, ids, mask)) * len(ids)
        count += len(ids)
    return total / max(count, 1)


@dataclass
class TrainResult:
    """What one local training run did."""

    losses: list[float]
    examples: int
    seconds: float
    epsilon: float | None = None
    round_epsilon: float | None = None
    accountant: AccountantState | None = None
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def samples_per_s(self) -> float:
        return self.examples / self.seconds if self.seconds > 0 else 0.0


def make_optimizer(model: torch.nn.Module, optim: OptimSpec) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no trainable parameters")
    return torch.optim.AdamW(params, lr=optim.learning_rate, weight_decay=optim.weight_decay)


def _cycle(loader: DataLoader) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    while True:
        yield from loader


def train(
    model: Any,
    data: TokenizedSet,
    optim: OptimSpec,
    privacy: PrivacySpec | None = None,
    accountant: AccountantState | None = None,
    stop_after: int | None = None,
    seed: int | None = None,
) -> TrainResult:
    """`optim.max_steps` AdamW steps over `data` (cycled); DP-SGD when `privacy.enabled`.

    `accountant` is the privacy already spent by this data owner; the result carries the updated
    state and both the cumulative and this run's epsilon. `stop_after` raises after that many steps
    (a simulated crash mid-round, used by tests and the benchmark). `seed` (default `optim.seed`)
    drives shuffling and DP noise; give each data owner its own.
    """
    if len(data) == 0:
        raise ValueError("no training examples")
    torch.manual_seed(optim.seed if seed is None else seed)
    model.train()
    optimizer = make_optimizer(model, optim)
    loader = DataLoader(
        TensorDataset(data.input_ids, data.attention_mask),
        batch_size=optim.batch_size,
        shuffle=True,
    )
    dp = privacy is not None and privacy.enabled
    private = make_private(model, optimizer, loader, privacy, accountant) if dp and privacy else None
    module, optimizer, loader = (
        (private.module, private.optimizer, private.loader) if private else (model, optimizer, loader)
    )
    losses: list[float] = []
    examples = 0
    started = time.perf_counter()
    batches = iter(_cycle(loader))
    for step in range(optim.max_steps):
        if stop_after is not None and step >= stop_after:
            raise RuntimeError(f"simulated client crash after {step} steps")
        ids, mask = next(batches)
        if len(ids) == 0 and private is not None and privacy is not None:
            private.account_skipped_step(privacy.noise_multiplier)
            continue
        optimizer.zero_grad(set_to_none=True)
        loss = causal_lm_loss(module, ids, mask)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        examples += len(ids)
    if private is not None:
        _unwrap(private.module)
    result = TrainResult(losses=losses, examples=examples, seconds=time.perf_counter() - started)
    if private is not None and privacy is not None:
        state = private.state()
        new_steps = state.total_steps() - (accountant.total_steps() if accountant else 0)
        result.accountant = state
        result.epsilon = epsilon(state.history(), privacy.delta)
        result.round_epsilon = epsilon([(privacy.noise_multiplier, private.sample_rate, new_steps)], privacy.delta)
    if not all(math.isfinite(x) for x in losses):
        raise FloatingPointError("training loss is not finite")
    return result


def _unwrap(module: Any) -> None:
    """Remove Opacus' hooks so the (shared) model can be evaluated and saved normally afterwards."""
    remove = getattr(module, "_close", None)
    if callable(remove):
        remove()
