"""Logging settings section (metrics need no settings: Ray exports them on each node's metrics port)."""

from typing import Literal

from pydantic import Field

from cluster.config.base import Section

LogFormat = Literal["text", "json"]
LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR"]


class LoggingSection(Section):
    """How every SolanaLM process logs (CLI, gateway, replicas, payments actor)."""

    format: LogFormat = Field(
        default="text", description="`json`: one JSON object per line with the request id; `text`: plain."
    )
    level: LogLevel = Field(default="INFO", description="Level of SolanaLM's own loggers.")
