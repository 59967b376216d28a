"""Small helpers for reading config values given on the command line."""

from __future__ import annotations

from collections.abc import Callable


def as_tuple(value, cast: Callable = str) -> tuple:
    """A tuple from a config value: a tuple/list, or comma-separated strings (``--config.x=1,2,4``
    arrives as ``("1,2,4",)`` for a tuple field)."""
    items = value if isinstance(value, (list, tuple)) else (value,)
    out = []
    for item in items:
        if isinstance(item, str):
            out += [cast(v.strip().strip("'\"")) for v in item.strip("()[] ").split(",") if v.strip()]
        else:
            out.append(cast(item))
    return tuple(out)
