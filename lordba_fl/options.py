"""Run-config keys declared where they belong: on the fields of each component's typed config.

A field declared ``steps: int = option(4, "train.local-steps", "Optimizer steps per round.")`` is the
one place that key lives: :mod:`lordba_fl.runconfig` builds its parser from these declarations,
``pyproject.toml`` is checked against the defaults they give, and ``docs/configuration.md`` is
generated from their help text (``python -m simulations.docs``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import field
from typing import Any

_TYPES = {"int": int, "float": float, "str": str, "bool": bool, "tuple[str, ...]": tuple}  # tuple: a comma list


def option(default: Any, key: str, help: str = "") -> Any:
    """A dataclass field that is the run-config key ``key`` (hyphenated, dotted), documented by ``help``."""
    return field(default=default, metadata={"key": key, "help": help})


def declared_keys(cls: type, path: str = "") -> dict[str, tuple[str, type, str]]:
    """``{key: (attribute path, type, help)}`` of ``cls``'s option fields, nested configs included."""
    out: dict[str, tuple[str, type, str]] = {}
    for f in dataclasses.fields(cls):
        sub = path + f.name
        if "key" in f.metadata:
            typ = _TYPES.get(f.type if isinstance(f.type, str) else f.type.__name__)
            if typ is None:
                raise TypeError(f"option {f.metadata['key']!r} of {cls.__name__} has unsupported type {f.type!r}")
            out[f.metadata["key"]] = (sub, typ, f.metadata["help"])
        elif dataclasses.is_dataclass(f.default) and not isinstance(f.default, type):  # a nested config
            out.update(declared_keys(type(f.default), sub + "."))
    return out
