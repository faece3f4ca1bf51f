"""The root settings object: nested sections from YAML, then SOLANALM_* environment overrides."""

from pathlib import Path
from typing import Any

import yaml
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from cluster.config.network import NetworkSection
from cluster.config.observability import LoggingSection
from cluster.config.payments import PaymentsSection
from cluster.config.provider import ProviderSection
from cluster.config.serving import HttpSection, ModelSection, PipelineSection, RaySection
from cluster.config.training import TrainingSection


class Settings(BaseSettings):
    """Every knob of SolanaLM. Env vars override YAML: SOLANALM_PIPELINE__NUM_STAGES=3."""

    model_config = SettingsConfigDict(
        env_prefix="SOLANALM_", env_nested_delimiter="__", extra="forbid", validate_assignment=True
    )

    ray: RaySection = Field(default_factory=RaySection, description="Ray cluster connection.")
    http: HttpSection = Field(default_factory=HttpSection, description="HTTP endpoint.")
    model: ModelSection = Field(default_factory=ModelSection, description="Served models and weight cache.")
    pipeline: PipelineSection = Field(default_factory=PipelineSection, description="Sharded pipeline shape.")
    payments: PaymentsSection = Field(default_factory=PaymentsSection, description="Metering and settlement.")
    training: TrainingSection = Field(default_factory=TrainingSection, description="Training jobs.")
    network: NetworkSection = Field(
        default_factory=NetworkSection, description="Provider network: registry, reputation, routing, placement."
    )
    provider: ProviderSection = Field(
        default_factory=ProviderSection, description="A provider machine's node: mode, hybrid CPU split."
    )
    logging: LoggingSection = Field(default_factory=LoggingSection, description="Log format (text or JSON), level.")

    @classmethod
    def settings_customise_sources(
        cls, settings_cls, init_settings, env_settings, dotenv_settings, file_secret_settings
    ):  # type: ignore[no-untyped-def, override]
        # Environment beats explicit values so an operator can override a YAML file without editing it.
        return env_settings, init_settings, file_secret_settings


def load_settings(path: Path | str | None = None, /, **overrides: Any) -> Settings:
    """Load settings from an optional YAML file of sections, with keyword sections merged on top."""
    data: dict[str, Any] = {}
    if path is not None:
        loaded = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: expected a mapping of settings sections")
        data.update(loaded)
    for section, values in overrides.items():
        merged = dict(data.get(section) or {})
        merged.update(values or {})
        data[section] = merged
    return Settings(**data)
