"""Read a diffusers / transformers `config.json` into a model's options, refusing what it lacks.

One rule for every twin network: each option the module implements has a default; an option it
implements only at one value is `fixed`; keys that do not change the computation are `ignored`
(diffusers' `_class_name`, `_diffusers_version`, ... start with "_" and are always ignored). Any
other key, or a fixed key at another value, is a UserError naming it and the file.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

from fewstep_jax.errors import UserError, did_you_mean


def read_options(
    config: Mapping[str, Any],
    defaults: Mapping[str, Any],
    *,
    what: str,
    fixed: Mapping[str, Any] | None = None,
    ignored: Collection[str] = (),
) -> dict[str, Any]:
    """{option: value} for every key of `defaults`, taken from `config` where present.

    what: names the source in errors, e.g. "unet/config.json (UNet2DConditionModel)".
    fixed: {option: the only supported value}; a config giving another value is an error (a
    value equal after list/tuple normalisation is accepted).
    """
    fixed = dict(fixed or {})
    out = dict(defaults)
    for key, value in config.items():
        if key.startswith("_") or key in ignored:
            continue
        if key in fixed:
            if _norm(value) != _norm(fixed[key]):
                raise UserError(
                    f"{what}: {key}={value!r} is not supported (only {fixed[key]!r} is implemented)"
                )
            continue
        if key not in defaults:
            raise UserError(
                f"{what}: unknown option {key!r}{did_you_mean(key, [*defaults, *fixed])} "
                "(not implemented by this project's twin of the model)"
            )
        out[key] = value
    return out


def _norm(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return tuple(_norm(v) for v in value)
    return value
