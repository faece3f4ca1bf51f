"""Shared base for settings sections: strict (unknown keys are errors), validated on assignment."""

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    """A settings section: unknown keys are rejected so a typo in YAML or env fails loudly."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)
