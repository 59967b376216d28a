"""Student step grids of TDM: where each of the K student steps starts and the interval it owns.

A K-step student samples from pure noise at ``t_max`` down to data; step ``j`` (``j = 0`` first)
maps ``x`` at ``start[j]`` to ``start[j + 1]`` (to data after the last step). In TDM each step
owns the time interval ``[low[j], start[j]]``: the student's intermediate state of that step is
diffused to a ``tau`` inside it and matched to the teacher's marginal there (docs/methods.md §4.2-4.4).

Two unit systems, one code path (times are handled in *units*, converted by :meth:`to_t`):

* ``integer=True`` (DDPM teachers, the official demo, docs/methods.md §4.3): units are DDPM timesteps
  ``k`` and ``t = (k + 1) / T``. ``start_k = k * total // K - 1`` (K = 4, total 900:
  {899, 674, 449, 224}), ``low = start - total // K + 1`` ({675, 450, 225, 0}), i.e. one
  timestep above the next start (pitfall 5). ``tau`` and the random mid-point are integers.
* ``integer=False`` (rectified flow and other continuous paths, docs/methods.md §4.7): units are ``t``,
  ``start_j = t_max (K - j) / K`` and ``low_j = t_max (K - j - 1) / K`` (K = 4: {1, .75, .5, .25}).

The sampling-steps-aware objective (docs/methods.md §4.4) draws K per sample from ``steps_set``; the
tables are (S, Kmax) with rows padded by repeating their last valid entry.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from fewstep_jax.paths import DDPM, Path

Array = jax.Array
INTERVALS = ("separate", "overlap")


def step_intervals(
    num_steps: int, *, integer: bool, t_max: float = 1.0, total_steps: int = 900
) -> tuple[np.ndarray, np.ndarray]:
    """``(start, low)`` of each step in sampling order, each (K,), in units (see module doc)."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    ks = np.arange(num_steps, 0, -1)
    if integer:
        if total_steps // num_steps < 2:
            raise ValueError(f"total_steps={total_steps} is too small for {num_steps} steps")
        start = ks * total_steps // num_steps - 1
        low = start - total_steps // num_steps + 1
        return start.astype(np.float64), low.astype(np.float64)
    if not 0.0 < t_max <= 1.0:
        raise ValueError(f"t_max must lie in (0, 1], got {t_max}")
    return t_max * ks / num_steps, t_max * (ks - 1) / num_steps


@dataclasses.dataclass(frozen=True)
class TDMSchedule:
    """Step tables and the time draws of TDM (hashable, static under jit).

    Attributes:
      steps_set: the student step counts K (one entry = fixed K).
      integer: DDPM integer timesteps (units k, ``t = (k+1)/T``) or continuous units ``t``.
      num_train_timesteps: T of the integer mode.
      t_max: first student time of the continuous mode.
      total_steps: the demo's ``total_steps`` (integer mode; 900 -> first step at 899).
      interval: ``"separate"`` (tau in the step's own interval, ``--use_separate``) or
        ``"overlap"`` (tau from the interval's low end up to ``tau_max``).
      tau_min, tau_margin, tau_max: ``tau ~ U[max(tau_min, low), start - tau_margin)`` (separate)
        or ``U[max(tau_min, low), tau_max)`` (overlap), in units (demo: 20, 10, 890).
      randmid: draw the DDIM target ``t_mid ~ U[low, start - randmid_margin)`` (``--use_randmid``)
        instead of ``t_mid = low``.
    """

    steps_set: tuple[int, ...] = (4,)
    integer: bool = False
    num_train_timesteps: int = 1000
    t_max: float = 1.0
    total_steps: int = 900
    interval: str = "separate"
    tau_min: float = 0.02
    tau_margin: float = 0.01
    tau_max: float = 0.99
    randmid: bool = False
    randmid_margin: float = 0.02

    def __post_init__(self):
        if not self.steps_set or any(int(k) < 1 for k in self.steps_set):
            raise ValueError(f"steps_set must be a non-empty tuple of K >= 1, got {self.steps_set}")
        if self.interval not in INTERVALS:
            raise ValueError(f"interval must be one of {INTERVALS}, got {self.interval!r}")
        if self.randmid and self.randmid_margin <= self.tau_margin:
            raise ValueError(
                f"randmid_margin ({self.randmid_margin}) must exceed tau_margin ({self.tau_margin}) "
                "so that tau can lie above the random mid-point"
            )
        start, low = self.tables()
        lo = np.maximum(self.tau_min, low)
        hi = start - self.tau_margin if self.interval == "separate" else np.full_like(start, self.tau_max)
        if np.any(hi <= lo):
            raise ValueError(
                f"empty tau interval for steps_set={self.steps_set}: tau_min={self.tau_min}, "
                f"tau_margin={self.tau_margin}, tau_max={self.tau_max} leave [lo, hi) = "
                f"[{lo.min()}, {hi.min()}) for some step"
            )

    @property
    def max_steps(self) -> int:
        return int(max(self.steps_set))

    def tables(self) -> tuple[np.ndarray, np.ndarray]:
        """``(start, low)`` of shape (S, Kmax) in units; rows padded with their last entry."""
        kmax = self.max_steps
        starts, lows = [], []
        for k in self.steps_set:
            s, lo = step_intervals(
                int(k), integer=self.integer, t_max=self.t_max, total_steps=self.total_steps
            )
            starts.append(np.concatenate([s, np.full(kmax - k, s[-1])]))
            lows.append(np.concatenate([lo, np.full(kmax - k, lo[-1])]))
        return np.stack(starts), np.stack(lows)

    def to_t(self, units: Array) -> Array:
        """Units -> continuous time in [0, 1]."""
        units = jnp.asarray(units, jnp.float32)
        return (units + 1.0) / self.num_train_timesteps if self.integer else units

    def _uniform(self, rng: Array, lo: Array, hi: Array) -> Array:
        u = jax.random.uniform(rng, jnp.shape(lo))
        v = lo + u * (hi - lo)
        # integer mode: floor of a uniform over [lo, hi) is randint(lo, hi) for integer bounds
        return jnp.minimum(jnp.floor(v), hi - 1.0) if self.integer else v

    def sample_steps(self, rng: Array, batch: int) -> tuple[Array, Array, Array, Array]:
        """Per sample: ``(k_index (B,) int32, step j (B,) int32, start (B,), low (B,))``, units.

        ``k_index`` indexes ``steps_set``; ``j ~ U{0..K-1}`` (the demo's ``k ~ U{1..4}``).
        """
        rk, rj = jax.random.split(rng)
        ks = jnp.asarray(self.steps_set, jnp.int32)
        kidx = jax.random.randint(rk, (batch,), 0, len(self.steps_set))
        j = jnp.floor(jax.random.uniform(rj, (batch,)) * ks[kidx]).astype(jnp.int32)
        j = jnp.minimum(j, ks[kidx] - 1)
        start, low = (jnp.asarray(a, jnp.float32) for a in self.tables())
        return kidx, j, start[kidx, j], low[kidx, j]

    def hop_times(self, kidx: Array, i: int) -> tuple[Array, Array]:
        """Units ``(start[i], start[i+1])`` of hop ``i`` of the backward simulation, each (B,)."""
        start = jnp.asarray(self.tables()[0], jnp.float32)
        nxt = min(i + 1, self.max_steps - 1)
        return start[kidx, i], start[kidx, nxt]

    def sample_mid_tau(self, rng: Array, start: Array, low: Array) -> tuple[Array, Array]:
        """``(t_mid, tau)`` in units, each (B,): the DDIM target of the step and the matching time."""
        rm, rt = jax.random.split(rng)
        mid = low
        if self.randmid:
            mid = self._uniform(rm, low, start - self.randmid_margin)
        # demo: tau ~ U[max(20, t_mid), ...): x_tau diffuses x_mid forward in time
        lo = jnp.maximum(self.tau_min, mid)
        hi = start - self.tau_margin if self.interval == "separate" else jnp.full_like(start, self.tau_max)
        return mid, self._uniform(rt, lo, hi)


def make_schedule(cfg, path: Path) -> TDMSchedule:
    """A :class:`TDMSchedule` from a loss config (keys of ``TDM_SCHEDULE_DEFAULTS``) and the path.

    ``integer_timesteps`` ``"auto"`` means integer units exactly when the path is a DDPM path; the
    integer-mode defaults of ``tau_min``/``tau_margin``/``tau_max``/``randmid_margin`` are the
    demo's 20/10/890/20 timesteps.
    """
    get = lambda k, d: cfg.get(k, d) if cfg is not None else d
    mode = get("integer_timesteps", "auto")
    integer = isinstance(path, DDPM) if mode == "auto" else bool(mode)
    if integer and not isinstance(path, DDPM):
        raise ValueError(f"integer_timesteps needs a DDPM path, got {path.name!r}")
    steps = get("num_steps", (4,))
    steps = (int(steps),) if isinstance(steps, (int, np.integer)) else tuple(int(k) for k in steps)
    dflt = (20.0, 10.0, 890.0, 20.0) if integer else (0.02, 0.01, 0.99, 0.02)
    auto = lambda k, d: float(d if get(k, None) in (None, "auto") else get(k, None))
    return TDMSchedule(
        steps_set=steps,
        integer=integer,
        num_train_timesteps=path.num_train_timesteps if integer else 1000,
        t_max=float(get("t_max", 1.0)),
        total_steps=int(get("total_steps", 900)),
        interval=str(get("interval", "separate")),
        tau_min=auto("tau_min", dflt[0]),
        tau_margin=auto("tau_margin", dflt[1]),
        tau_max=auto("tau_max", dflt[2]),
        randmid=bool(get("randmid", False)),
        randmid_margin=auto("randmid_margin", dflt[3]),
    )


TDM_SCHEDULE_DEFAULTS = {
    "num_steps": (4,),
    "integer_timesteps": "auto",
    "t_max": 1.0,
    "total_steps": 900,
    "interval": "separate",
    "tau_min": "auto",
    "tau_margin": "auto",
    "tau_max": "auto",
    "randmid": False,
    "randmid_margin": "auto",
}

__all__ = ["INTERVALS", "TDM_SCHEDULE_DEFAULTS", "TDMSchedule", "make_schedule", "step_intervals"]
