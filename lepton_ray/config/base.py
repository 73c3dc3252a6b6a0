"""What every section shares: the ``Section`` base class (unknown keys refused) and the
validation context key that turns the data-file checks off away from the user's machine."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, ValidationInfo

CHECK_FILES = "check_files"
"""Validation context key. False where a config is re-validated away from the user's
machine (Ray Train workers, Tune trials, ``lepton-ray submit``): the data files are read by
the driver's Ray Data tasks, so another node need not hold them at the same path."""


def checking_files(info: ValidationInfo) -> bool:
    return (info.context or {}).get(CHECK_FILES, True)


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, validate_default=True)
