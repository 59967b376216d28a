"""Orbax checkpoints of the train state (+ JSON metadata), corruption fallback and preemption.

Layout: `<workdir>/checkpoints/<step>/{state,meta}`, one orbax Composite per step so that a
step's state and its metadata (data position, config name, ...) are committed together.

Multi-process: every process must call `save`, `restore_latest`, `wait` and `close` (orbax
coordinates the processes and each writes the shards it owns); only process 0 renames
corrupt checkpoints aside, and side files (configs, reports) should be written by process 0 only.

Corruption: a step that fails to restore (missing/truncated/garbled files, no commit marker)
is logged by name, renamed to `<step>.corrupt` (never deleted) and the previous step is tried.
A checkpoint that reads fine but does not match the requested state raises
`CheckpointMismatchError` instead: that is a code/config change, not a broken file.

A failed read must not leave reads in flight: orbax runs a restore in a fresh asyncio loop
(`run_until_complete`, then `close`) over `asyncio.gather` of the arrays' tensorstore reads, so
the first failing read ends it while its siblings are still pending; when those complete,
tensorstore's callback posts to the closed loop ("RuntimeError: Event loop is closed", one
traceback each). Restores therefore run with loops that let their pending tasks finish before
closing (`_loops_finish_pending_tasks`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

COMMIT_MARKER = "commit_success.txt"  # written by orbax >= 0.12.3 into every finalized step
CORRUPT_SUFFIX = ".corrupt"
_STATE, _META = "state", "meta"


class CheckpointMismatchError(ValueError):
    """The checkpoint's tree (keys, shapes) differs from the state it is restored into."""


_FINISH_SECONDS = 300.0  # a read still pending after this is cancelled


class _FinishPendingLoop(asyncio.SelectorEventLoop):
    """An event loop that, when closed, first runs the tasks still pending on it to completion
    (a failed restore's sibling reads) and retrieves their results and exceptions."""

    def close(self) -> None:
        if not self.is_closed() and not self.is_running():
            pending = [t for t in asyncio.all_tasks(self) if not t.done()]
            if pending:
                _, stuck = self.run_until_complete(asyncio.wait(pending, timeout=_FINISH_SECONDS))
                for t in stuck:
                    t.cancel()
                self.run_until_complete(asyncio.gather(*pending, return_exceptions=True))  # retrieves them
        super().close()


class _FinishPendingPolicy(asyncio.DefaultEventLoopPolicy):
    def new_event_loop(self) -> asyncio.AbstractEventLoop:
        return _FinishPendingLoop()


@contextlib.contextmanager
def _loops_finish_pending_tasks():
    """Event loops created inside (orbax's, one per restore) finish their tasks before closing."""
    previous = asyncio.get_event_loop_policy()
    asyncio.set_event_loop_policy(_FinishPendingPolicy())
    try:
        yield
    finally:
        asyncio.set_event_loop_policy(previous)


def _path_str(path: tuple) -> str:
    # DictKey / GetAttrKey / SequenceKey all become plain names, so a namedtuple field in the
    # requested state matches the dict key orbax stores for it.
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {_path_str(p): tuple(getattr(x, "shape", ())) for p, x in leaves}


def check_tree_matches(stored: Any, target: Any, where: str = "checkpoint") -> None:
    """Raise CheckpointMismatchError naming the first keys / shapes that differ."""
    s, t = _shapes(stored), _shapes(target)
    missing = sorted(set(t) - set(s))
    extra = sorted(set(s) - set(t))
    shapes = sorted(k for k in set(s) & set(t) if s[k] != t[k])
    problems = []
    if missing:
        problems.append(f"keys missing in the {where}: {missing[:10]}")
    if extra:
        problems.append(f"keys in the {where} but not in the state: {extra[:10]}")
    if shapes:
        problems.append(
            "shape mismatch: " + ", ".join(f"{k}: {where} {s[k]} vs state {t[k]}" for k in shapes[:10])
        )
    if problems:
        raise CheckpointMismatchError("; ".join(problems))


class Checkpointer:
    """Keeps the last `keep` checkpoints of every `save_every`-th step in `directory`."""

    def __init__(self, directory: str | Path, save_every: int, keep: int, async_save: bool = True):
        if save_every < 1 or keep < 1:
            raise ValueError(f"save_every={save_every} and keep={keep} must be >= 1")
        # epath: local paths and gs:// buckets alike (TPU pods write to GCS).
        self.directory = epath.Path(directory)
        if not self.directory.is_absolute():
            self.directory = self.directory.absolute()
        self._options = ocp.CheckpointManagerOptions(
            save_interval_steps=save_every,
            max_to_keep=keep,
            enable_async_checkpointing=async_save,
            create=True,
        )
        self._mngr = self._new_manager()

    def _new_manager(self) -> ocp.CheckpointManager:
        # Explicit handlers (not just item names) so that item_metadata works before any save.
        handlers = {_STATE: ocp.StandardCheckpointHandler(), _META: ocp.JsonCheckpointHandler()}
        return ocp.CheckpointManager(self.directory, item_handlers=handlers, options=self._options)

    def all_steps(self) -> list[int]:
        """Steps of the finalized checkpoints, ascending."""
        return sorted(self._mngr.all_steps())

    def save(self, step: int, state: Any, meta: dict, force: bool = False) -> bool:
        """Save if `step` is due (every `save_every` steps) or `force`, and not yet saved;
        returns whether it did.

        With async_save the write continues in the background; `state` may be donated after
        this returns (orbax copies device arrays first)."""
        args = ocp.args.Composite(**{_STATE: ocp.args.StandardSave(state), _META: ocp.args.JsonSave(meta)})
        try:
            return self._mngr.save(step, args=args, force=force)
        except ocp.checkpoint_manager.StepAlreadyExistsError:
            return False  # e.g. the final forced save of a step the interval already saved

    def _step_dir(self, step: int) -> epath.Path:
        return self.directory / str(step)

    def _set_aside(self, step: int, reason: str) -> None:
        src = self._step_dir(step)
        dst = src.with_name(src.name + CORRUPT_SUFFIX)
        n = 1
        while dst.exists():
            dst = src.with_name(f"{src.name}{CORRUPT_SUFFIX}.{n}")
            n += 1
        logging.error(
            "checkpoint step %d in %s is corrupt or incomplete (%s); moved to %s, "
            "falling back to the previous checkpoint",
            step, self.directory, reason, dst.name,
        )  # fmt: skip
        if jax.process_index() == 0 and src.exists():
            src.rename(dst)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"fewstep_checkpoint_set_aside_{step}")

    def _restore_step(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        with _loops_finish_pending_tasks():
            return self._read_step(step, abstract_state)

    def _read_step(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        if not (self._step_dir(step) / COMMIT_MARKER).exists():
            raise FileNotFoundError(f"no {COMMIT_MARKER} in {self._step_dir(step)}")
        stored = self._mngr.item_metadata(step)[_STATE]
        if stored is None:
            raise FileNotFoundError(f"no readable state metadata in {self._step_dir(step)}")
        check_tree_matches(getattr(stored, "tree", stored), abstract_state,
                           where=f"checkpoint {self._step_dir(step)}")  # fmt: skip
        out = self._mngr.restore(
            step,
            args=ocp.args.Composite(
                **{_STATE: ocp.args.StandardRestore(abstract_state), _META: ocp.args.JsonRestore()}
            ),
        )
        return out[_STATE], out[_META]

    def restore_latest(self, abstract_state: Any) -> tuple[Any, dict, int] | None:
        """(state, meta, step) of the newest good checkpoint, or None if there is none.

        abstract_state: the state's tree with `jax.ShapeDtypeStruct` leaves (e.g. from
        `jax.eval_shape`) carrying the target shardings: restored arrays land on them.
        Raises CheckpointMismatchError if the newest readable checkpoint has other keys/shapes.
        """
        self._mngr.wait_until_finished()
        result, set_aside = None, False
        for step in sorted(self._mngr.all_steps(), reverse=True):
            try:
                state, meta = self._restore_step(step, abstract_state)
            except CheckpointMismatchError:
                raise
            except Exception as e:  # any read failure of this step means it cannot be used
                self._set_aside(step, f"{type(e).__name__}: {str(e)[:300]}")
                set_aside = True
                continue
            logging.info("restored checkpoint step %d from %s", step, self.directory)
            result = (state, meta, step)
            break
        if set_aside:
            # Forget the steps set aside, so that max_to_keep pruning counts only good ones.
            self._mngr.reload()
        return result

    def reached_preemption(self, step: int) -> bool:
        """True when the run should save now and exit: SIGTERM was seen (see
        `install_preemption_handler`) or, on multi-host runs, JAX's preemption service reached
        its sync point (orbax's check; the same answer on every process)."""
        return preempted() or self._mngr.reached_preemption(step)

    def wait(self) -> None:
        """Block until async saves are written."""
        self._mngr.wait_until_finished()

    def close(self) -> None:
        self._mngr.close()


_PREEMPTED = threading.Event()


def install_preemption_handler(signals: tuple[int, ...] = (signal.SIGTERM,)) -> None:
    """Turn SIGTERM into the `preempted()` flag so that the loop can save and exit cleanly.

    Single-process runs only need this. On multi-process runs `jax.distributed.initialize`
    starts JAX's preemption service, which catches SIGTERM itself and tells all processes at the
    same step via `Checkpointer.reached_preemption`; a flag set on one process alone would make
    that process save while the others do not (a hang), so there this is a no-op.
    Call from the main thread, after `parallel.initialize_distributed` (it queries devices).
    """
    if jax.process_count() > 1:
        return
    for s in signals:
        signal.signal(s, lambda _signum, _frame: _PREEMPTED.set())


def preempted() -> bool:
    """Whether a preemption signal was received (see `install_preemption_handler`)."""
    return _PREEMPTED.is_set()
