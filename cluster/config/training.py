"""Training settings section (owned by the train_jobs package's maintainers)."""

from cluster.config.base import Section


class TrainingSection(Section):
    """Ray Train and Flower defaults shared by the training jobs."""
