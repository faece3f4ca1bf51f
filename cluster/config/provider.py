"""A provider machine's own settings: which mode its node starts in and how a hybrid node splits its CPUs."""

from typing import Literal

from pydantic import Field

from cluster.config.base import Section

NodeMode = Literal["serving", "training", "hybrid"]


class HybridSection(Section):
    """How a node that serves stages and trains at once shares its CPUs. Serving has priority: training gets
    `train_threads` (or `train_cpu_fraction` of the CPUs), never more than what leaves the stage host
    `min_serve_threads`, and its process runs at a lower scheduling priority (`train_nice`)."""

    train_threads: int | None = Field(
        default=None, ge=1, le=1024, description="Torch threads of the training process (None: train_cpu_fraction)."
    )
    train_cpu_fraction: float = Field(
        default=0.5, gt=0, lt=1, description="Share of this node's CPUs training takes when train_threads is unset."
    )
    min_serve_threads: int = Field(
        default=1, ge=1, le=1024, description="Torch threads the stage host always keeps in hybrid mode."
    )
    train_nice: int = Field(
        default=10, ge=0, le=19, description="Nice increment of the training process (serving stays ahead of it)."
    )


class ProviderSection(Section):
    """`solanalm provider serve`'s node: its starting mode, the hybrid split, how long mode switches may wait."""

    mode: NodeMode = Field(default="serving", description="Mode the node starts in (switch: `provider mode`).")
    hybrid: HybridSection = Field(default_factory=HybridSection, description="The CPU split of hybrid mode.")
    drain_timeout_s: float = Field(
        default=300.0,
        gt=0,
        le=3600,
        description="How long a switch to training waits for the operator to move this node's stages away"
        " (its coordinators' streams to close); after it the stages are dropped and the operator fails over.",
    )
    round_timeout_s: float = Field(
        default=900.0,
        gt=0,
        le=86_400,
        description="How long leaving training waits for the training round in progress to finish.",
    )
