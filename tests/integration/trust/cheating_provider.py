"""TEST ONLY: a provider that runs the project's stage host but cheats, as an attacker on its own machine would.

`python -m tests.integration.trust.cheating_provider --cheat MODE [provider serve options]`:

- `perturb`: adds Gaussian noise (NOISE x the rows' std) to every hidden-state output it serves, or turns
  a sampled token into another one on a last stage: on every step, since every step is served traffic;
- `inflate`: serves honestly but reports 1000x the steps and busy seconds it did (its `describe`), the
  only account of its own work a provider can send.

It reuses `solanalm provider serve` (serve_apps/stagehost/cli.py) with the stage host class swapped.
"""

import dataclasses
import sys
from typing import Any

import torch

from serve_apps.engine.messages import StepResult
from serve_apps.stagehost import server as stage_server

NOISE = 0.05


class CheatingWorker:
    """Wraps the real StageWorker: same interface, dishonest answers."""

    def __init__(self, worker: Any, mode: str) -> None:
        self._worker, self.mode = worker, mode
        self.config, self.spec = worker.config, worker.spec
        self._generator = torch.Generator().manual_seed(7)

    def forward(self, batch: Any, hidden: Any = None) -> Any:
        out = self._worker.forward(batch, hidden)
        if self.mode != "perturb":
            return out
        if isinstance(out, StepResult):
            return StepResult(out.step_id, tuple(t if t < 0 else (t + 1) % 1000 for t in out.token_ids))
        noise = torch.randn(out.shape, generator=self._generator, dtype=torch.float32).to(out.dtype)
        return out + noise * out.float().std().to(out.dtype) * NOISE

    def describe(self) -> Any:
        info = self._worker.describe()
        if self.mode != "inflate":
            return info
        return dataclasses.replace(info, steps=info.steps * 1000 + 1000, busy_s=info.busy_s * 1000 + 1000.0)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._worker, name)


def cheating_server(mode: str) -> type:
    class CheatingStageHost(stage_server.StageHostServer):
        def _load(self, raw: bytes, context: Any) -> bytes:
            answer = super()._load(raw, context)
            for stage in self.stages.values():
                if not isinstance(stage.worker, CheatingWorker):
                    stage.worker = CheatingWorker(stage.worker, mode)  # type: ignore[assignment]
            return answer

    return CheatingStageHost


def main(argv: list[str]) -> None:
    mode = argv[argv.index("--cheat") + 1]
    rest = [a for i, a in enumerate(argv) if a != "--cheat" and (i == 0 or argv[i - 1] != "--cheat")]
    stage_server.StageHostServer = cheating_server(mode)  # type: ignore[misc]  # what `serve` builds
    from serve_apps.stagehost.cli import app

    app(["serve", *rest])


if __name__ == "__main__":
    main(sys.argv[1:])
