"""What every config section shares: unknown keys, inf and nan refused; one error type."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from threetowers.errors import UserError


class ConfigError(UserError, ValueError):
    """A config the user wrote (or overrode) is invalid; the message says where and how to fix."""


class Section(BaseModel):
    # inf and nan pass range checks such as gt=0 (inf > 0), then poison a run much later
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)
