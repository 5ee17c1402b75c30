"""Shared pieces of twinfed's TOML configuration files: strict models, checked fields, clear load errors."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated, TypeVar
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError


class StrictModel(BaseModel):
    """A frozen model that rejects unknown keys, so a typo in a file is an error, not a silent default."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_time_zone(zone: str) -> str:
    try:
        ZoneInfo(zone)
    except (ZoneInfoNotFoundError, ValueError) as error:
        raise ValueError(f"unknown IANA time zone {zone!r}") from error
    return zone


TimeZoneName = Annotated[str, AfterValidator(_check_time_zone)]
SiteId = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_-]{1,31}$")]

Model = TypeVar("Model", bound=BaseModel)


def load_toml_model(path: Path, model: type[Model], error: type[ValueError]) -> Model:
    """Parse a TOML file into `model`; any problem raises `error` naming the file and each bad field."""
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError as missing:
        raise error(f"{path}: no such file") from missing
    except tomllib.TOMLDecodeError as bad:
        raise error(f"{path}: not valid TOML: {bad}") from bad
    try:
        return model.model_validate(raw)
    except ValidationError as invalid:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in invalid.errors())
        raise error(f"{path}: {problems}") from invalid
