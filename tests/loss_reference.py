"""Independent references for the loss-equation tests (tests/test_loss_equations_*.py).

Written from the equations of docs/methods.md, not from the package: paths, prediction
conversions, the Gaussian-mixture posterior, a tiny MLP and the distances, each once, in
array-API style so the same code runs in numpy float64 (loss values) and in ``jax.numpy`` under
``jax.grad`` (reference gradients, with the stop-gradients the equations name). Only the
``Teacher`` and ``Student`` wrappers handed to the package's loss terms come from the package.

``X`` bundles the array module and the stop-gradient: ``NP`` (numpy, ``sg`` the identity) or
``JX`` (``jax.numpy``, ``jax.lax.stop_gradient``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fewstep_jax.losses.api import LossInputs
from fewstep_jax.paths import DDPM, RectifiedFlow, VPCosine
from fewstep_jax.students import Student
from fewstep_jax.teachers.analytic import gaussian_mixture_teacher, gmm_params


@dataclasses.dataclass(frozen=True)
class X:
    xp: Any
    sg: Any


NP = X(np, lambda v: v)
JX = X(jnp, jax.lax.stop_gradient)


def col(v, xp=np):
    """(B,) -> (B, 1) for broadcasting against (B, D)."""
    return xp.reshape(v, (-1, 1))


# ---------------------------------------------------------------------------------------------
# paths: x_t = alpha x0 + sigma eps (t = 0 data), docs/methods.md §1.1
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RefPath:
    """``name``: rf, vp_cosine or ddpm (``abar`` the 1000-step table; log abar linear in t between
    the points t_k = (k + 1) / T, t = 0 is abar = 1)."""

    name: str
    abar: Any = None

    def alpha_sigma(self, t, xp=np):
        if self.name == "rf":
            return 1.0 - t, t
        if self.name == "vp_cosine":
            return xp.cos(0.5 * math.pi * t), xp.sin(0.5 * math.pi * t)
        T = len(self.abar)
        grid = np.arange(T + 1) / T
        la = np.concatenate([[0.0], np.log(self.abar)])
        log_abar = xp.interp(t, xp.asarray(grid), xp.asarray(la))
        return xp.exp(0.5 * log_abar), xp.sqrt(1.0 - xp.exp(log_abar))

    def derivatives(self, t, xp=np):
        """``(alpha', sigma')``."""
        if self.name == "rf":
            return -xp.ones_like(t), xp.ones_like(t)
        if self.name == "vp_cosine":
            return -0.5 * math.pi * xp.sin(0.5 * math.pi * t), 0.5 * math.pi * xp.cos(0.5 * math.pi * t)
        raise NotImplementedError("the references only need DDPM at (x0, eps) level")

    def logsnr_half(self, t, xp=np):
        """``lambda = log(alpha / sigma)`` (TCD's half log-SNR)."""
        a, s = self.alpha_sigma(t, xp)
        return xp.log(a) - xp.log(s)

    def t_from_logsnr_half(self, lam, xp=np):
        if self.name == "rf":  # alpha / sigma = (1 - t) / t
            return 1.0 / (1.0 + xp.exp(lam))
        if self.name == "vp_cosine":  # alpha / sigma = cot(pi t / 2)
            return (2.0 / math.pi) * xp.arctan(xp.exp(-lam))
        raise NotImplementedError


def scaled_linear_abar(T=1000, b0=0.00085, b1=0.012):
    betas = np.linspace(b0**0.5, b1**0.5, T) ** 2
    return np.cumprod(1.0 - betas)


def linear_abar(T=1000, b0=1e-4, b1=0.02):
    return np.cumprod(1.0 - np.linspace(b0, b1, T))


REF_PATHS = {
    "rf": (RectifiedFlow(), RefPath("rf")),
    "vp_cosine": (VPCosine(), RefPath("vp_cosine")),
    "ddpm": (DDPM(), RefPath("ddpm", scaled_linear_abar())),
    "ddpm_linear": (DDPM(schedule="linear", beta_start=1e-4, beta_end=0.02), RefPath("ddpm", linear_abar())),
}


def to_x0_eps(path: RefPath, pred, kind: str, x, t, xp=np):
    """``(x0, eps)`` implied by a prediction of ``kind`` at ``(x, t)`` (the definitions of §1.1)."""
    a, s = (col(v, xp) for v in path.alpha_sigma(t, xp))
    if xp is np:  # the unused half of the pair may divide by a vanishing alpha or sigma
        with np.errstate(divide="ignore", invalid="ignore"):
            return _to_x0_eps(path, pred, kind, x, t, a, s, xp)
    return _to_x0_eps(path, pred, kind, x, t, a, s, xp)


def _to_x0_eps(path, pred, kind, x, t, a, s, xp):
    if kind == "x0":
        return pred, (x - a * pred) / s
    if kind == "eps":
        return (x - s * pred) / a, pred
    if kind == "v":  # v = alpha eps - sigma x0
        n2 = a * a + s * s
        return (a * x - s * pred) / n2, (s * x + a * pred) / n2
    if kind == "flow":  # u = alpha' x0 + sigma' eps, with x = alpha x0 + sigma eps
        da, ds = (col(v, xp) for v in path.derivatives(t, xp))
        det = a * ds - s * da
        return (ds * x - s * pred) / det, (a * pred - da * x) / det
    raise ValueError(kind)


def velocity_of(path: RefPath, x0, eps, t, xp=np):
    da, ds = (col(v, xp) for v in path.derivatives(t, xp))
    return da * x0 + ds * eps


def interpolate(path: RefPath, x0, eps, t, xp=np):
    a, s = path.alpha_sigma(t, xp)
    return col(a, xp) * x0 + col(s, xp) * eps


# ---------------------------------------------------------------------------------------------
# distances (docs/methods.md §1.3), per sample (B,)
# ---------------------------------------------------------------------------------------------


def dist(a, b, kind="l2", c=0.0, xp=np):
    d = a - b
    if kind == "l2":
        return xp.mean(d * d, axis=1)
    if kind in ("huber", "pseudo_huber"):
        c = c or 1e-3
        return xp.mean(xp.sqrt(d * d + c * c) - c, axis=1)
    if kind == "huber_vec":
        c = c or 0.00054 * math.sqrt(d.shape[1])
        return xp.sqrt(xp.sum(d * d, axis=1) + c * c) - c
    raise ValueError(kind)


# ---------------------------------------------------------------------------------------------
# the Gaussian-mixture teacher: exact posterior means by linear algebra on the covariances
# ---------------------------------------------------------------------------------------------

MIX_MEANS = np.array([[1.2, -0.4, 0.3], [-0.9, 0.8, -0.5], [0.2, 0.1, 1.1]])
MIX_COVS = np.stack(
    [
        np.array([[0.30, 0.08, 0.00], [0.08, 0.20, 0.05], [0.00, 0.05, 0.25]]),
        np.array([[0.15, -0.04, 0.02], [-0.04, 0.35, 0.00], [0.02, 0.00, 0.10]]),
        np.diag([0.2, 0.12, 0.3]),
    ]
)
MIX_WEIGHTS = np.array([0.5, 0.3, 0.2])
MIX_LABELS = np.array([0, 1, 1])  # class 1 is a two-component mixture; label -1 is the full mixture


def teacher_for(path, conditional=True):
    """The package's exact teacher of the mixture above on ``path`` (the object the terms call)."""
    params = gmm_params(MIX_MEANS, MIX_COVS, MIX_WEIGHTS, MIX_LABELS)
    return gaussian_mixture_teacher(params, path, conditional=conditional)


def gmm_x0_eps(path: RefPath, x, t, label=None):
    """``(E[x0 | x_t], E[eps | x_t])`` (numpy float64): ``x_t | k ~ N(a mu_k, a^2 S_k + s^2 I)``."""
    x, t = np.asarray(x, np.float64), np.asarray(t, np.float64)
    a, s = path.alpha_sigma(t)
    B, D = x.shape
    logits, x0s, epss = [], [], []
    for mu, S, w, lab in zip(MIX_MEANS, MIX_COVS, MIX_WEIGHTS, MIX_LABELS):
        C = a[:, None, None] ** 2 * S + s[:, None, None] ** 2 * np.eye(D)
        m = x - a[:, None] * mu
        sol = np.linalg.solve(C, m[..., None])[..., 0]
        logp = -0.5 * np.sum(m * sol, axis=1) - 0.5 * np.linalg.slogdet(2 * np.pi * C)[1]
        keep = np.ones(B, bool) if label is None else (np.asarray(label) < 0) | (np.asarray(label) == lab)
        logits.append(np.where(keep, np.log(w) + logp, -np.inf))
        x0s.append(mu + a[:, None] * sol @ S)  # S symmetric: (S sol)^T = sol^T S
        epss.append(s[:, None] * sol)
    logits = np.stack(logits, 1)
    r = np.exp(logits - logits.max(1, keepdims=True))
    r /= r.sum(1, keepdims=True)
    return np.einsum("bk,kbd->bd", r, np.stack(x0s)), np.einsum("bk,kbd->bd", r, np.stack(epss))


def guided_x0_eps(path: RefPath, x, t, label, scale):
    """Imagen-form guidance ``p_u + scale (p_c - p_u)`` applied to x0 and eps (docs/methods.md §1.4);
    ``scale`` a number or (B,); ``scale == 1`` (or no label) is the conditional posterior alone."""
    x0_c, eps_c = gmm_x0_eps(path, x, t, label)
    if label is None or np.all(np.asarray(scale) == 1.0):
        return x0_c, eps_c
    x0_u, eps_u = gmm_x0_eps(path, x, t, -np.ones_like(np.asarray(label)))
    w = col(np.broadcast_to(np.asarray(scale, np.float64), (x.shape[0],)))
    return x0_u + w * (x0_c - x0_u), eps_u + w * (eps_c - eps_u)


def gmm_velocity(path: RefPath, x, t, label=None, scale=1.0):
    x0, eps = guided_x0_eps(path, x, t, label, scale)
    return velocity_of(path, x0, eps, np.asarray(t, np.float64))


# ---------------------------------------------------------------------------------------------
# a tiny MLP, one parameter group per input (so each part of a gradient can be checked)
# ---------------------------------------------------------------------------------------------

HIDDEN = 12


def time_features(t, xp):
    return xp.stack([t, t * t, xp.sin(3.0 * t)], axis=-1)


def mlp_init(seed, dim=3, uses_s=False, num_classes=0, guidance=False, step_classes=0, scale=0.6):
    """Params of :func:`mlp_apply` (float32 jax arrays); every weight non-zero."""
    r = np.random.default_rng(seed)
    g = lambda *shape: jnp.asarray(scale * r.standard_normal(shape), jnp.float32)
    p = {"x": g(dim, HIDDEN), "t": g(3, HIDDEN), "b": g(HIDDEN), "out": g(HIDDEN, dim), "out_b": g(dim)}
    if uses_s:
        p["s"] = g(3, HIDDEN)
    if num_classes:
        p["label"] = g(num_classes + 1, HIDDEN)  # row 0: the null label -1
    if guidance:
        p["guidance"] = g(HIDDEN)
    if step_classes:
        p["steps"] = g(step_classes, HIDDEN)
    return p


def mlp_apply(p, x, t, s=None, label=None, guidance=None, num_steps=None, xp=np):
    """``out(tanh(x W_x + f(t) W_t [+ f(s) W_s] [+ E_label] [+ w W_g] [+ E_steps] + b))``."""
    t = xp.broadcast_to(t, (x.shape[0],))
    h = x @ p["x"] + time_features(t, xp) @ p["t"] + p["b"]
    if "s" in p and s is not None:
        h = h + time_features(xp.broadcast_to(s, (x.shape[0],)), xp) @ p["s"]
    if "label" in p and label is not None:
        h = h + p["label"][label + 1]
    if "guidance" in p and guidance is not None:
        h = h + col(guidance, xp) * p["guidance"]
    if "steps" in p and num_steps is not None:
        h = h + p["steps"][num_steps]
    return xp.tanh(h) @ p["out"] + p["out_b"]


def mlp_student(path, form="euler", prediction="flow", uses_s=True) -> Student:
    """The package's Student wrapper around :func:`mlp_apply` (its raw network)."""

    def apply(params, x, t, s, label, guidance, num_steps, rngs, train):
        return mlp_apply(params, x, t, s, label, guidance, num_steps, xp=jnp)

    return Student(apply=apply, path=path, form=form, prediction=prediction, uses_s=uses_s)


def to_np(tree):
    return jax.tree.map(lambda v: np.asarray(v, np.float64) if np.asarray(v).dtype.kind == "f" else v, tree)


def net(X_: X, p, x, t, s=None, **kw):
    """The raw network in numpy (float64 params) or jax."""
    return mlp_apply(p, x, t, s, xp=X_.xp, **kw)


# ---------------------------------------------------------------------------------------------
# running the package's terms
# ---------------------------------------------------------------------------------------------


def inputs(teacher, student, ema=None, others=None, nets=()):
    return LossInputs(
        teacher=teacher,
        student=student,
        ema={} if ema is None else {"target": ema},
        others=others or {},
        step=jnp.zeros((), jnp.int32),
        nets=tuple(nets),
    )


def float_leaves(tree):
    return [np.asarray(v) for v in jax.tree.leaves(tree) if np.asarray(v).dtype.kind == "f"]


def teacher_float_params(teacher):
    return {k: v for k, v in teacher.params.items() if np.asarray(v).dtype.kind == "f"}


def with_teacher_params(teacher, floats):
    return teacher.replace(params={**teacher.params, **floats})


def assert_all_zero(tree, what):
    for leaf in float_leaves(tree):
        assert np.all(leaf == 0.0), f"{what} received gradient (max |g| = {np.abs(leaf).max():.3g})"


def assert_groups_nonzero(grads: dict, groups, what=""):
    """Each named parameter group of an MLP gradient is non-zero somewhere."""
    for g in groups:
        assert float(np.abs(np.asarray(grads[g])).max()) > 0.0, f"{what}: no gradient into part {g!r}"


def assert_tree_close(got, want, rtol=1e-4, atol=1e-6, what=""):
    for k in want:
        np.testing.assert_allclose(
            np.asarray(got[k]),
            np.asarray(want[k]),
            rtol=rtol,
            atol=atol,
            err_msg=f"{what}: gradient of {k!r}",
        )


__all__ = [
    "JX",
    "NP",
    "REF_PATHS",
    "RefPath",
    "X",
    "assert_all_zero",
    "assert_groups_nonzero",
    "assert_tree_close",
    "col",
    "dist",
    "float_leaves",
    "gmm_velocity",
    "gmm_x0_eps",
    "guided_x0_eps",
    "inputs",
    "interpolate",
    "linear_abar",
    "mlp_apply",
    "mlp_init",
    "mlp_student",
    "net",
    "scaled_linear_abar",
    "teacher_float_params",
    "teacher_for",
    "to_np",
    "to_x0_eps",
    "velocity_of",
    "with_teacher_params",
]
