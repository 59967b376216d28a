"""The one reader of a loss term's config block, used by every family (docs/methods.md §1.3).

A term's block is ``config.losses.<term>`` (or ``config.aux_nets.<net>.losses.<term>``): its
``weight`` belongs to the train step (:func:`fewstep_jax.train.step.build_terms` reads it and
passes the rest to the factory), every other key is one of the term's own hyper-parameters.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fewstep_jax.errors import UserError, did_you_mean

# keys of a term block that the train step reads; a factory called directly may be given them
TRAIN_STEP_KEYS = frozenset({"weight"})


def read_options(
    cfg: Any,
    defaults: Mapping[str, Any],
    term: str,
    choices: Mapping[str, tuple] | None = None,
) -> dict[str, Any]:
    """``defaults`` overridden by the term's block ``cfg`` (a ConfigDict, a mapping or None).

    ``weight`` (:data:`TRAIN_STEP_KEYS`) is dropped; any other key not in ``defaults`` is an error
    naming the term and the key, with the closest known key when there is one. ``choices`` maps
    an option to its allowed values, checked when the option is one of the term's.
    """
    given = {k: v for k, v in (cfg.items() if cfg is not None else ()) if k not in TRAIN_STEP_KEYS}
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        known = [*defaults, *TRAIN_STEP_KEYS]
        # did_you_mean gives " (did you mean ...?)"; one parenthesis holds the hints of every key
        hints = [f"{key!r}: {hint.strip(' ()')}" for key in unknown if (hint := did_you_mean(key, known))]
        hint = f" ({'; '.join(hints)})" if hints else ""
        raise UserError(
            f"loss term {term!r}: unknown config keys {unknown}{hint}; known: {sorted(defaults)} "
            f"(and the train step's {sorted(TRAIN_STEP_KEYS)})"
        )
    out = {**defaults, **given}
    for key, allowed in (choices or {}).items():
        if key in out and out[key] not in allowed:
            raise UserError(f"loss term {term!r}: {key} must be one of {allowed}, got {out[key]!r}")
    return out


__all__ = ["TRAIN_STEP_KEYS", "read_options"]
