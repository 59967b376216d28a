"""diffusers' ``FlowMatchEulerDiscreteScheduler`` (0.42), the sampler of SD3, SD3.5 and Flux, on the
:class:`~fewstep_jax.paths.RectifiedFlow` path.

diffusers' flow-match ``sigma`` is the path's time ``t`` (``x_t = (1 - t) x0 + t eps``), its
timesteps are ``sigma * num_train_timesteps`` and the model's output is the velocity
``eps - x0``; so a sampling schedule is a time grid of the project's solvers
(:func:`flow_match_grid`, the ``flow_match[:key=value...]`` grid of ``solvers.make_grid``) and the
scheduler's step is the solvers' Euler step on it.

Facts of the reference (pinned by tests/test_flow_match_scheduler.py):

* ``set_timesteps(N)`` spaces N timesteps linearly from ``sigma_max T`` to ``sigma_min T``, where
  the bounds are those of the 1000-point training table built at construction, already shifted by
  ``shift`` (so the static shift applies twice to the smallest sigma: ``shift=3`` starts the
  linspace's end at 0.002994, not 0.001). The linspace is float64; sigmas given by the caller (the
  Flux pipeline passes ``linspace(1, 1/N, N)``, :func:`flux_pipeline_sigmas`) are float32 and every later
  operation on them is float32 (numpy's promotion), as in diffusers.
* Shifting: static ``shift s / (1 + (shift - 1) s)``, or with ``use_dynamic_shifting`` the
  resolution-dependent ``e^mu / (e^mu + 1/s - 1)`` (``time_shift_type="exponential"``) or
  ``mu / (mu + 1/s - 1)`` (``"linear"``), ``mu`` from the image's token count by the pipelines'
  ``calculate_shift`` (:func:`calculate_shift`, :func:`image_seq_len`). Then ``shift_terminal``
  (when truthy) stretches ``1 - s`` so the last sigma is ``shift_terminal``; then Karras (rho 7),
  exponential or beta (0.6, 0.6) spacing between the first and last sigma. Sigmas are rounded to
  float32, timesteps are ``sigma * T`` in float32 (or the caller's timesteps), and a terminal
  sigma 0 is appended.
* ``step``: in float32, ``x + (sigma_next - sigma) v`` (``sigma_next - sigma`` rounded to the
  model output's dtype before the product, torch's 0-dim promotion), or with
  ``stochastic_sampling`` ``(1 - sigma_next) (x - sigma v) + sigma_next z``; the result is cast
  to the model output's dtype.
* ``shift_terminal`` on a schedule whose last sigma is 1 (one step from sigma 1) is 0 / 0 in
  diffusers (NaN sigmas, then its step fails): refused with an error.
* ``invert_sigmas`` (Mochi: sigmas ``1 - sigma`` ending at 1) runs the path backwards and is
  refused; ``per_token_timesteps`` (a step argument) is not offered; ``s_churn`` and friends are
  arguments the step never reads.

Read from a ``scheduler_config.json`` by ``scheduler_config.read_scheduler_config`` (unknown keys
are errors naming them).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from fewstep_jax.errors import UserError
from fewstep_jax.schedules.ddpm import Array, noise_at

FLOW_MATCH = "FlowMatchEulerDiscreteScheduler"
TIME_SHIFT_TYPES = ("exponential", "linear")
# every __init__ option of the diffusers class, at its default
FLOW_MATCH_DEFAULTS: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "use_dynamic_shifting": False,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
    "invert_sigmas": False,
    "shift_terminal": None,
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "time_shift_type": "exponential",
    "stochastic_sampling": False,
}
GRID_NAME = "flow_match"
# options of a grid name that are set_timesteps arguments, not config keys
GRID_OPTIONS = ("mu", "image_seq_len", "flux_sigmas")
_KARRAS_RHO = 7.0
_BETA_AB = 0.6  # diffusers' _convert_to_beta alpha = beta


def calculate_shift(
    image_seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """The Flux / SD3 pipelines' ``mu``: linear in the token count, ``base_shift`` at
    ``base_seq_len`` tokens and ``max_shift`` at ``max_seq_len``."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * slope + (base_shift - slope * base_seq_len)


def image_seq_len(height: int, width: int, vae_scale_factor: int = 8, patch_size: int = 2) -> int:
    """Image tokens of a ``height x width`` image: latents ``H // vae_scale_factor`` in patches of
    ``patch_size`` (SD3's ``patch_size``; Flux packs 2 x 2, the same count: 4096 at 1024 x 1024)."""
    return (int(height) // vae_scale_factor // patch_size) * (int(width) // vae_scale_factor // patch_size)


def flux_pipeline_sigmas(num_steps: int) -> np.ndarray:
    """The custom sigmas ``FluxPipeline`` passes to ``set_timesteps``: ``linspace(1, 1/N, N)``."""
    return np.linspace(1.0, 1.0 / num_steps, num_steps)


@dataclasses.dataclass(frozen=True)
class FlowMatchConfig:
    """The options of a ``FlowMatchEulerDiscreteScheduler`` (hashable: a static jit argument);
    defaults are the class's."""

    num_train_timesteps: int = 1000
    shift: float = 1.0
    use_dynamic_shifting: bool = False
    base_shift: float = 0.5
    max_shift: float = 1.15
    base_image_seq_len: int = 256
    max_image_seq_len: int = 4096
    invert_sigmas: bool = False
    shift_terminal: float | None = None
    use_karras_sigmas: bool = False
    use_exponential_sigmas: bool = False
    use_beta_sigmas: bool = False
    time_shift_type: str = "exponential"
    stochastic_sampling: bool = False

    cls = FLOW_MATCH  # a class attribute, like SchedulerConfig's field

    def __post_init__(self):
        where = f"{FLOW_MATCH} config"
        if self.invert_sigmas:
            raise UserError(
                f"{where}: invert_sigmas=True is not supported (Mochi's sigmas 1 - sigma end at "
                "sigma 1: the RectifiedFlow path run from data to noise)"
            )
        if self.time_shift_type not in TIME_SHIFT_TYPES:
            raise UserError(
                f"{where}: time_shift_type {self.time_shift_type!r} is not one of {TIME_SHIFT_TYPES}"
            )
        spacings = [
            k for k in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas") if getattr(self, k)
        ]
        if len(spacings) > 1:
            raise UserError(f"{where}: only one of {spacings} can be used")
        if int(self.num_train_timesteps) < 1:
            raise UserError(f"{where}: num_train_timesteps must be >= 1, got {self.num_train_timesteps}")

    def sigma_bounds(self) -> tuple[float, float]:
        """``(sigma_max, sigma_min)`` of the training table built at construction (float32 values):
        ``1`` and ``1 / T``, statically shifted unless shifting is dynamic."""
        T = self.num_train_timesteps
        ends = np.array([T, 1], np.float32) / T
        if not self.use_dynamic_shifting:
            ends = self.shift * ends / (1 + (self.shift - 1) * ends)
        return float(ends[0]), float(ends[1])

    def mu(self, image_seq_len: int) -> float:
        """:func:`calculate_shift` of ``image_seq_len`` tokens with this config's bounds."""
        return calculate_shift(
            image_seq_len, self.base_image_seq_len, self.max_image_seq_len, self.base_shift, self.max_shift
        )

    def set_timesteps(
        self,
        num_steps: int | None = None,
        *,
        sigmas: Sequence[float] | np.ndarray | None = None,
        mu: float | None = None,
        timesteps: Sequence[float] | np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """``set_timesteps(num_steps, sigmas=, mu=, timesteps=)``: ``(timesteps (N,), sigmas (N + 1,))``,
        float32, descending, the sigmas ending with the terminal 0.

        ``mu`` is required with ``use_dynamic_shifting`` (ignored otherwise, as there); custom
        ``timesteps`` without ``sigmas`` are returned as given while their sigmas are shifted."""
        if self.use_dynamic_shifting and mu is None:
            raise UserError(
                f"{FLOW_MATCH} with use_dynamic_shifting needs mu (FlowMatchConfig.mu(image_seq_len))"
            )
        if sigmas is not None and timesteps is not None and len(sigmas) != len(timesteps):
            raise UserError("sigmas and timesteps must have the same length")
        if num_steps is None:
            if sigmas is None and timesteps is None:
                raise UserError("pass num_steps, sigmas or timesteps")
        elif any(c is not None and len(c) != num_steps for c in (sigmas, timesteps)):
            raise UserError("sigmas and timesteps must have num_steps entries when num_steps is given")
        elif int(num_steps) < 1:
            raise UserError(f"num_steps must be >= 1, got {num_steps}")
        T = self.num_train_timesteps
        given_t = None if timesteps is None else np.asarray(timesteps).astype(np.float32)
        if sigmas is not None:
            s = np.asarray(sigmas).astype(np.float32)
        elif given_t is not None:
            s = given_t / T
        else:
            smax, smin = self.sigma_bounds()
            s = np.linspace(smax * T, smin * T, int(num_steps)) / T  # float64, as there
        n = len(s)
        if self.use_dynamic_shifting:
            c = math.exp(mu) if self.time_shift_type == "exponential" else mu
            s = c / (c + (1 / s - 1))
        else:
            s = self.shift * s / (1 + (self.shift - 1) * s)
        if self.shift_terminal:
            one_minus = 1 - s
            if one_minus[-1] == 0:
                raise UserError(
                    f"{FLOW_MATCH}: shift_terminal needs a last sigma below 1 (here {n} step(s) "
                    "ending at sigma 1: diffusers' stretch divides 0 by 0, NaN sigmas)"
                )
            s = 1 - one_minus / (one_minus[-1] / (1 - self.shift_terminal))
        s = self._respace(s, n)
        s32 = np.asarray(s).astype(np.float32)
        ts = given_t if given_t is not None else s32 * T
        return ts, np.concatenate([s32, np.zeros(1, np.float32)])

    def _respace(self, s: np.ndarray, n: int) -> np.ndarray:
        """Karras / exponential / beta spacing between the first and last sigma (float64)."""
        if not (self.use_karras_sigmas or self.use_exponential_sigmas or self.use_beta_sigmas):
            return s
        hi, lo = s[0].item(), s[-1].item()
        if self.use_karras_sigmas:
            inv_hi, inv_lo = hi ** (1 / _KARRAS_RHO), lo ** (1 / _KARRAS_RHO)
            return (inv_hi + np.linspace(0, 1, n) * (inv_lo - inv_hi)) ** _KARRAS_RHO
        if self.use_exponential_sigmas:
            return np.exp(np.linspace(math.log(hi), math.log(lo), n))
        try:
            from scipy.stats import beta
        except ImportError as e:
            raise UserError(f"{FLOW_MATCH} with use_beta_sigmas needs scipy: pip install scipy") from e
        return lo + beta.ppf(1 - np.linspace(0, 1, n), _BETA_AB, _BETA_AB) * (hi - lo)

    def sample(
        self,
        model_fn,
        x: Array,
        num_steps: int | None = None,
        *,
        sigmas=None,
        mu: float | None = None,
        timesteps=None,
        noises=None,
        return_trajectory: bool = False,
    ):
        """The diffusers loop: ``set_timesteps`` then ``step`` per timestep on
        ``model_fn(x, timestep)`` (a float32 timestep ``sigma T``; pipelines hand the transformer
        ``timestep / T`` (Flux) or ``timestep`` (SD3)). ``noises`` (N, ...): the draws of
        ``stochastic_sampling``."""
        ts, sig = self.set_timesteps(num_steps, sigmas=sigmas, mu=mu, timesteps=timesteps)
        return flow_match_sample(model_fn, x, ts, sig, noises, self.stochastic_sampling, return_trajectory)


def flow_match_step(
    model_output: Array,
    sigma: float,
    sigma_next: float,
    sample: Array,
    noise: Array | None = None,
    *,
    stochastic: bool = False,
) -> Array:
    """One ``FlowMatchEulerDiscreteScheduler.step`` from ``sigma`` to ``sigma_next`` on the velocity
    ``model_output``; ``noise`` (like ``sample``) is needed with ``stochastic``. Returns the model
    output's dtype."""
    v = jnp.asarray(model_output)
    x = jnp.asarray(sample, jnp.float32)
    sig, nxt = jnp.float32(sigma), jnp.float32(sigma_next)
    if stochastic:
        if noise is None:
            raise ValueError("stochastic flow-match sampling needs the injected noise")
        x0 = x - sig.astype(v.dtype) * v
        out = (1.0 - nxt) * x0 + nxt * jnp.asarray(noise, jnp.float32)
    else:
        out = x + (nxt - sig).astype(v.dtype) * v
    return out.astype(v.dtype)


def flow_match_sample(
    model_fn,
    x: Array,
    timesteps,
    sigmas,
    noises=None,
    stochastic: bool = False,
    return_trajectory: bool = False,
):
    """The scheduler loop over ``timesteps`` (N,) with ``sigmas`` (N + 1,): step i goes from
    ``sigmas[i]`` to ``sigmas[i + 1]`` (diffusers' step index; its lookup of the first timestep
    differs only when that timestep repeats)."""
    ts = np.asarray(timesteps, np.float32)
    sig = np.asarray(sigmas, np.float32)
    if len(sig) != len(ts) + 1:
        raise ValueError(f"{len(ts)} timesteps need {len(ts) + 1} sigmas, got {len(sig)}")
    traj = [x]
    for i, t in enumerate(ts):
        z = noise_at(noises, i, len(ts), "stochastic flow-match sampling") if stochastic else None
        x = flow_match_step(model_fn(x, t), sig[i], sig[i + 1], x, z, stochastic=stochastic)
        traj.append(x)
    return (x, traj) if return_trajectory else x


def flow_match_grid(
    num_steps: int,
    config: FlowMatchConfig | None = None,
    *,
    mu: float | None = None,
    image_seq_len: int | None = None,
    flux_sigmas: bool = False,
) -> np.ndarray:
    """The scheduler's sigmas with the terminal 0, (N + 1,) float32: RectifiedFlow times from
    (about) 1 down to 0, for the solvers (Euler on it is the scheduler's loop) and students.

    ``mu`` or ``image_seq_len`` (``mu = config.mu(image_seq_len)``) for dynamic shifting;
    ``flux_sigmas``: start from the custom sigmas ``FluxPipeline`` passes."""
    config = config or FlowMatchConfig()
    if mu is not None and image_seq_len is not None:
        raise UserError("pass mu or image_seq_len, not both")
    if image_seq_len is not None:
        mu = config.mu(int(image_seq_len))
    custom = flux_pipeline_sigmas(int(num_steps)) if flux_sigmas else None
    return config.set_timesteps(num_steps, sigmas=custom, mu=mu)[1]


def is_flow_match_grid(kind: str) -> bool:
    return str(kind).split(":", 1)[0] == GRID_NAME


def grid_from_name(kind: str, num_steps: int) -> np.ndarray:
    """The grid of a name ``flow_match[:key=value...]`` (``:``-separated: a config's lists are
    comma-separated): keys are ``FlowMatchEulerDiscreteScheduler`` options (unknown ones are
    errors) and ``mu``, ``image_seq_len``, ``flux_sigmas`` (:func:`flow_match_grid`), e.g.
    ``flow_match:shift=3.0`` (SD3) or
    ``flow_match:use_dynamic_shifting=true:image_seq_len=4096:flux_sigmas=true`` (Flux, 1024 px)."""
    from fewstep_jax.evaluation.teacher_solvers import _option_value  # the diffusers_* names' values
    from fewstep_jax.schedules.scheduler_config import read_scheduler_config

    head, *parts = str(kind).split(":")
    if head != GRID_NAME:
        raise UserError(f"{kind!r} is not a {GRID_NAME}[:key=value...] grid")
    options = {}
    for part in parts:
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise UserError(f"time grid {kind!r}: {part!r} is not key=value")
        options[key.strip()] = _option_value(value)
    args = {k: options.pop(k) for k in GRID_OPTIONS if k in options}
    config = read_scheduler_config(options, FLOW_MATCH, what=f"time grid {kind!r}")
    if config.stochastic_sampling:
        raise UserError(
            f"time grid {kind!r}: stochastic_sampling is the scheduler's step, not its grid "
            "(FlowMatchConfig.sample runs it)"
        )
    return flow_match_grid(
        num_steps,
        config,
        mu=args.get("mu"),
        image_seq_len=args.get("image_seq_len"),
        flux_sigmas=bool(args.get("flux_sigmas", False)),
    )


__all__ = [
    "FLOW_MATCH",
    "FLOW_MATCH_DEFAULTS",
    "GRID_NAME",
    "GRID_OPTIONS",
    "TIME_SHIFT_TYPES",
    "FlowMatchConfig",
    "calculate_shift",
    "flow_match_grid",
    "flow_match_sample",
    "flow_match_step",
    "flux_pipeline_sigmas",
    "grid_from_name",
    "image_seq_len",
    "is_flow_match_grid",
]
