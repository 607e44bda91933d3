"""Pydantic validation errors as one line naming the file, the field path and what would be valid.

Shared by `pools.yaml` and policy files so both reject unknown keys the same helpful way.
"""

from __future__ import annotations

import types
import typing

from pydantic import BaseModel, ValidationError


def _model_at(model: type[BaseModel], path: tuple[int | str, ...]) -> type[BaseModel] | None:
    """The model class that holds the field at `path` (list indices and dict keys skipped)."""
    current: object = model
    for part in path:
        if isinstance(current, type) and issubclass(current, BaseModel) and isinstance(part, str):
            field = current.model_fields.get(part)
            if field is None:
                return None
            current = field.annotation
        current = _unwrap(current)
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _unwrap(annotation: object) -> object:
    """`list[X]`, `X | None`, `dict[str, X]` → X, so a path can step through containers."""
    while True:
        args = typing.get_args(annotation)
        origin = typing.get_origin(annotation)
        if origin in (list, tuple, dict, typing.Union, types.UnionType) and args:
            models = [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]
            if models:
                return models[0]
            annotation = args[-1]
            if origin in (typing.Union, types.UnionType):
                return annotation
        else:
            return annotation


def problems(error: ValidationError, model: type[BaseModel]) -> list[tuple[tuple[int | str, ...], str]]:
    """Every problem as (field path, what is wrong; what would be valid), unknown keys first.

    An unknown key comes before anything else: it is usually a misspelling of a key that is then
    also reported missing, and naming the misspelling is what helps.
    """
    found = []
    for e in sorted(error.errors(), key=lambda e: e["type"] != "extra_forbidden"):
        loc = tuple(e["loc"])
        if e["type"] == "extra_forbidden":
            holder = _model_at(model, loc[:-1])
            valid = ", ".join(holder.model_fields) if holder else "see the schema"
            found.append((loc, f"unknown key {loc[-1]!r}; valid keys here: {valid}"))
        elif e["type"] == "missing":
            found.append((loc, "required but missing"))
        else:
            value = e.get("input")
            got = "" if isinstance(value, dict | list) else f" (got {value!r})"
            found.append((loc, e["msg"].removeprefix("Value error, ") + got))
    return found


def explain(error: ValidationError, model: type[BaseModel], source: str) -> str:
    """The first problem, as `source: a.b.c: what is wrong; what would be valid`."""
    loc, message = problems(error, model)[0]
    where = ".".join(str(p) for p in loc) or "(top level)"
    return f"{source}: {where}: {message}"
