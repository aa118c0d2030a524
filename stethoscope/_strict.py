"""A pydantic base whose unknown keys are errors with a did-you-mean, and the formatter for them.

Every configuration model in stethoscope (monitor, probing, ...) derives from :class:`StrictModel` and is
validated through :func:`validate_config`, so a mistyped key anywhere reads the same:
``unknown key 'sampling.evry' (in stethoscope.yaml): did you mean 'every'?``.
"""

from __future__ import annotations

import contextvars
import difflib
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from stethoscope.errors import ConfigError

M = TypeVar("M", bound=BaseModel)

# Where the data being validated came from (a file name), for StrictRootModel's error messages.
_SOURCE: contextvars.ContextVar[str | None] = contextvars.ContextVar("stethoscope_config_source", default=None)


class StrictModel(BaseModel):
    """Forbids unknown keys and re-validates on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class StrictRootModel(StrictModel):
    """A top-level config: built in Python (``Config(sampling={"evry": 3})``) it raises the same
    :class:`ConfigError` with a did-you-mean as a YAML file or dict would.

    Only for models that are never nested: pydantic runs a custom ``__init__`` for nested models too.
    """

    def __init__(self, /, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as err:
            source = _SOURCE.get() or f"{type(self).__name__}(...)"
            raise ConfigError(format_validation_error(type(self), err, source)) from None


def _model_at(model: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    """The nested model class that owns the field at ``loc`` (list indexes skipped)."""
    current: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        fields = getattr(current, "model_fields", None)
        if not fields or part not in fields:
            return None
        annotation = fields[part].annotation
        current = _first_model(annotation)
        if current is None:
            return None
    return current


def _first_model(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _first_model(arg)
        if found is not None:
            return found
    return None


def format_validation_error(model: type[BaseModel], err: ValidationError, source: str) -> str:
    """One line per problem: the dotted key, where it came from, what is wrong, and the closest valid key."""
    lines: list[str] = []
    merged: dict[str, int] = {}  # one line per key: a union's per-member errors are joined
    for item in err.errors():
        loc = _field_loc(model, tuple(item.get("loc", ())))
        dotted = ".".join(str(p) for p in loc) or "<root>"
        if item.get("type") == "extra_forbidden":
            owner = _model_at(model, loc[:-1])
            valid = sorted(owner.model_fields) if owner is not None else []
            close = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.5)
            hint = f"did you mean {close[0]!r}?" if close else f"valid keys here: {', '.join(valid)}"
            lines.append(f"unknown key {dotted!r} (in {source}): {hint}")
        else:
            given = item.get("input")
            shown = repr(given)
            if len(shown) > 80:
                shown = shown[:77] + "..."
            if dotted in merged:
                lines[merged[dotted]] = lines[merged[dotted]].replace("; got ", f", or {item.get('msg')}; got ", 1)
                continue
            merged[dotted] = len(lines)
            lines.append(f"invalid value for {dotted!r} (in {source}): {item.get('msg')}; got {shown}")
    return "\n".join(lines)


def _field_loc(model: type[BaseModel], loc: tuple) -> tuple:
    """``loc`` cut after the last real field (pydantic appends union members such as ``list[str]``)."""
    current: Any = model
    kept: list = []
    for part in loc:
        if isinstance(part, int):
            kept.append(part)
            continue
        fields = getattr(current, "model_fields", None)
        if fields is None or part not in fields:
            if current is model or fields is not None:
                kept.append(part)  # an unknown key: keep it, the caller names it
            break
        kept.append(part)
        current = _first_model(fields[part].annotation)
    return tuple(kept)


def validate_config(model: type[M], data: Any, source: str = "config") -> M:
    """Validate ``data`` against ``model``; raise :class:`ConfigError` with readable lines on failure."""
    if data is None:
        data = {}
    if isinstance(data, model):
        return data
    if not isinstance(data, dict):
        raise ConfigError(
            f"the configuration in {source} must be a mapping of sections to options, "
            f"got {type(data).__name__}"
        )
    token = _SOURCE.set(source)
    try:
        if issubclass(model, StrictRootModel):
            bad = [k for k in data if not isinstance(k, str)]
            if bad:
                raise ConfigError(f"configuration keys must be names (strings), got {bad[0]!r} in {source}")
            return model(**data)  # its __init__ formats the error (model_validate would re-wrap it)
        return model.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(model, err, source)) from None
    finally:
        _SOURCE.reset(token)


def read_yaml(path: str | Path) -> Any:
    """Read a YAML file, turning a missing file or a syntax error into a ConfigError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"configuration file {str(path)!r} does not exist (pass a path to a YAML file)")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read configuration file {str(path)!r}: {exc}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(
            f"configuration file {str(path)!r} is not valid YAML{where}: {problem}"
        ) from None
