"""User errors: a mistake in what was asked for (a name, a value, a missing file or package).

Library code raises :class:`UserError` where it detects one (a ``ValueError``, so callers that
catch ``ValueError`` keep working). The command lines (``fewstep``, ``python -m
fewstep_jax.modes.dryrun``, ``python -m fewstep_jax.bench.distill``) report a user error as one
line ``error: ...`` on stderr and exit with status 2, without a traceback: :func:`run_cli` around
the command's body, :func:`parse_flags_or_exit` as absl's flag parser. ``--verbose`` or
``FEWSTEP_VERBOSE=1`` adds the traceback. Anything else (a bug) propagates with its traceback.
"""

from __future__ import annotations

import difflib
import importlib
import os
import sys
import traceback
from collections.abc import Callable, Iterable
from types import ModuleType
from typing import Any, TypeVar

T = TypeVar("T")
EXIT_CODE = 2  # what argparse and absl use for a bad command line
VERBOSE_ENV = "FEWSTEP_VERBOSE"
TORCH_EXTRA = 'pip install "fewstep-jax[torch]"'
TFDS_EXTRA = 'pip install "fewstep-jax[tfds]"'
LATENT_EXTRA = 'pip install "fewstep-jax[latent]"'
LORA_EXTRA = 'pip install "fewstep-jax[lora]"'
# the packages of the optional extras (setup.py) -> how to install them
INSTALL_HINTS = {
    "torch": TORCH_EXTRA,
    "diffusers": TORCH_EXTRA,
    "safetensors": "pip install safetensors",
    "tokenizers": LATENT_EXTRA,
    "sentencepiece": LATENT_EXTRA,
    "qwix": LORA_EXTRA,
    "tensorflow": TFDS_EXTRA,
    "tensorflow_datasets": TFDS_EXTRA,
}


class UserError(ValueError):
    """A mistake in the user's request, reported at the command line as one line."""


class MissingPackageError(UserError, ImportError):
    """An optional package (an extra) is not installed; also an ImportError."""


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """``" (did you mean 'x'?)"`` for the choice closest to ``name`` (difflib), ``""`` if none is
    close."""
    close = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def unknown(kind: str, name: str, choices: Iterable[str]) -> UserError:
    """``unknown <kind> 'name' (did you mean ...?); known: [...]``, to raise."""
    choices = sorted(str(c) for c in choices)
    return UserError(f"unknown {kind} {name!r}{did_you_mean(name, choices)}; known: {choices}")


def require(module: str, purpose: str) -> ModuleType:
    """``import module``; a missing package is a UserError naming ``purpose`` and the install
    command (e.g. ``require("torch", "the PyTorch self-check")``)."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        err = missing_package(e, purpose)
        if err is None:
            raise
        raise err from e


def missing_package(e: ModuleNotFoundError, purpose: str = "this command") -> MissingPackageError | None:
    """The error of a missing package of :data:`INSTALL_HINTS`; None for any other module."""
    top = (e.name or "").split(".")[0]
    if top not in INSTALL_HINTS:
        return None
    return MissingPackageError(f"{purpose} needs {top}, which is not installed: {INSTALL_HINTS[top]}")


def user_message(e: BaseException) -> str | None:
    """The one-line message of a user error, None when ``e`` is not one (a bug).

    User errors: a :class:`UserError` (also when absl / ml_collections wrapped it, e.g. raised by
    a config file's ``get_config``), a missing file or an existing output (``FileNotFoundError``,
    ``FileExistsError``), a missing package of :data:`INSTALL_HINTS`, a bad flag (absl)."""
    from absl import flags

    chain = _chain(e)
    inner = next((x for x in reversed(chain) if isinstance(x, UserError)), None)
    if inner is not None:
        return _one_line(str(inner))
    if isinstance(e, (FileNotFoundError, FileExistsError)):
        return _one_line(str(e))
    if isinstance(e, ModuleNotFoundError) and (err := missing_package(e)) is not None:
        return str(err)
    if isinstance(e, flags.Error) and "Error whilst parsing config file" not in str(e):
        return _one_line(str(e))  # a config file that raised a non-user error is a bug: traceback
    return None


def verbose(argv: Iterable[str] = ()) -> bool:
    """Whether to show tracebacks: ``FEWSTEP_VERBOSE=1`` or ``--verbose`` (absl flag or argv)."""
    if os.environ.get(VERBOSE_ENV, "").lower() in ("1", "true", "yes"):
        return True
    from absl import flags

    if "verbose" in flags.FLAGS and flags.FLAGS["verbose"].present:
        return bool(flags.FLAGS["verbose"].value)
    return any(a in ("--verbose", "-verbose", "--verbose=true", "--verbose=1") for a in argv)


def define_verbose_flag() -> None:
    """The absl flag ``--verbose`` (once per process)."""
    from absl import flags

    if "verbose" not in flags.FLAGS:
        flags.DEFINE_bool("verbose", False, f"Show the traceback of a user error (or {VERBOSE_ENV}=1).")


def exit_with(e: BaseException, message: str, argv: Iterable[str] = ()) -> None:
    """Prints ``error: message`` (after the traceback when verbose) and exits with EXIT_CODE."""
    if verbose(argv):
        traceback.print_exception(e)
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(EXIT_CODE)


def run_cli(fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)``; a user error (:func:`user_message`) exits with one line, others propagate."""
    try:
        return fn(*args)
    except Exception as e:
        message = user_message(e)
        if message is None:
            raise
        exit_with(e, message, sys.argv)
        raise  # unreachable: exit_with exits


def parse_flags_or_exit(argv: list[str]) -> list[str]:
    """absl's flag parsing for ``app.run(main, flags_parser=parse_flags_or_exit)`` of a command
    with a config-file flag ``--config``: a missing config file, an unknown config key (with the
    closest real key), a value of the wrong type, a user error of the config file or any bad flag
    exits with one line."""
    from absl import flags

    try:
        _check_config_file(argv)
        return flags.FLAGS(argv)
    except (AttributeError, KeyError) as e:  # an override of a key the config lacks
        message = _unknown_key_message(argv)
        if message is None:
            raise
        exit_with(e, message, argv)
    except Exception as e:
        message = user_message(e) if not isinstance(e, TypeError) else _one_line(str(e))
        if message is None:
            raise
        exit_with(e, message, argv)
    raise AssertionError("unreachable")


def _check_config_file(argv: list[str]) -> None:
    """A ``--config`` file that does not exist is a UserError with the closest file next to it
    (ml_collections would defer it to a multi-line error at the first access)."""
    value = _config_arg(argv)
    if value is None:
        return
    path = value.split(":", 1)[0]
    if path and not os.path.isfile(path):
        folder = os.path.dirname(path) or "."
        files = os.listdir(folder) if os.path.isdir(folder) else []
        siblings = [os.path.join(os.path.dirname(path), f) for f in files if f.endswith(".py")]
        raise UserError(f"config file {path!r} not found{did_you_mean(path, siblings)}")


def _config_arg(argv: list[str]) -> str | None:
    for i, a in enumerate(argv):
        if a.startswith(("--config=", "-config=")):
            return a.split("=", 1)[1]
        if a in ("--config", "-config") and i + 1 < len(argv):
            return argv[i + 1]
    return None


def _unknown_key_message(argv: list[str]) -> str | None:
    """``unknown config key 'a.b' (did you mean 'a.c'?)`` for the first override the config lacks;
    None when every override exists (the KeyError came from elsewhere)."""
    from absl import flags

    overrides = [a.lstrip("-").split("=", 1)[0].split(".", 1)[1] for a in argv if a.startswith("--config.")]
    config = flags.FLAGS["config"].parser.parse(_config_arg(argv))  # it parsed once already
    for key in overrides:
        node, parts = config, key.split(".")
        for i, part in enumerate(parts):
            keys = [str(k) for k in node] if hasattr(node, "keys") else []
            if part not in keys:
                candidates = [".".join([*parts[:i], k, *parts[i + 1 :]]) for k in keys]
                return (
                    f"unknown config key {key!r}{did_you_mean(key, candidates)}; only the keys the config "
                    "file defines (fewstep_jax/recipes/base.py and its own) can be set"
                )
            node = node[part]
    return None


def _chain(e: BaseException) -> list[BaseException]:
    """``e`` and the exceptions it was raised from or during, outermost first."""
    out: list[BaseException] = []
    while e is not None and e not in out:
        out.append(e)
        e = e.__cause__ or e.__context__
    return out


def _one_line(text: str) -> str:
    return " ".join(text.split())


__all__ = [
    "EXIT_CODE",
    "INSTALL_HINTS",
    "TFDS_EXTRA",
    "TORCH_EXTRA",
    "MissingPackageError",
    "UserError",
    "define_verbose_flag",
    "did_you_mean",
    "exit_with",
    "missing_package",
    "parse_flags_or_exit",
    "require",
    "run_cli",
    "unknown",
    "user_message",
    "verbose",
]
