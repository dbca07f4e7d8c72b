"""The base class of every recipe section: frozen, and unknown keys are errors."""

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
