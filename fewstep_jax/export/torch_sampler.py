"""Plain-PyTorch few-step samplers for exported fewstep-jax students (no JAX).

A student is a flow map G(x, t, s) (t = 1 noise, t = 0 data) built from a network
`net(x, t, s)` whose output is a prediction of kind `prediction` on the interpolation path
`x_t = alpha(t) x0 + sigma(t) eps`:
    form "euler":      G = x + (s - t) * velocity(net(x, t, s))
    form "semilinear": G = alpha(s) x0 + sigma(s) eps, (x0, eps) from net(x, t, s)
A sampler chains jumps t_0 = 1 > t_1 > ... > t_N = 0. With gamma > 0 each jump lands at
s' = (1 - gamma) t_{i+1} and is re-noised forward to t_{i+1} (TCD's strategic stochastic
sampling; gamma = 1 is multistep consistency sampling), except on the last step.

    from torch_models import load_exported
    from torch_sampler import sample_exported
    model, cfg = load_exported("exported/")
    x0 = sample_exported(model, cfg, torch.randn(16, *cfg["input_shape"]))  # NCHW for images
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

Network = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


# ---- paths (torch twins of fewstep_jax.paths) -------------------------------------------------
class Path:
    """alpha(t), sigma(t) of a named path; derivatives by forward-mode autodiff."""

    def __init__(self, name: str, **params: Any):
        self.name, self.params = name, params
        self.deriv_floor = {"vp_linear": 1e-5, "ddpm": 1e-5}.get(name, 0.0)
        if name == "ddpm":
            n = int(params.get("num_train_timesteps", 1000))
            b0, b1 = float(params.get("beta_start", 0.00085)), float(params.get("beta_end", 0.012))
            schedule = params.get("schedule", "scaled_linear")
            if schedule == "linear":
                betas = torch.linspace(b0, b1, n, dtype=torch.float64)
            elif schedule == "scaled_linear":
                betas = torch.linspace(b0**0.5, b1**0.5, n, dtype=torch.float64) ** 2
            else:
                raise ValueError(f"unknown DDPM beta schedule {schedule!r}")
            zero = torch.zeros(1, dtype=torch.float64)
            log_abar = torch.cat([zero, torch.log(torch.cumprod(1 - betas, 0))])
            self._ts = (torch.arange(n + 1, dtype=torch.float64) / n).to(torch.float32)
            self._la = log_abar.to(torch.float32)
        elif name not in ("rf", "vp_cosine", "vp_linear", "ve"):
            raise ValueError(f"unknown path {name!r}; expected rf, vp_cosine, vp_linear, ddpm or ve")

    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = t.to(torch.float32)
        if self.name == "rf":
            return 1.0 - t, t
        if self.name == "vp_cosine":
            return torch.sin(0.5 * math.pi * (1.0 - t)), torch.sin(0.5 * math.pi * t)
        if self.name == "vp_linear":
            b0, b1 = float(self.params.get("beta_min", 0.1)), float(self.params.get("beta_max", 20.0))
            la = -(b0 * t + 0.5 * (b1 - b0) * t * t)
            return torch.exp(0.5 * la), torch.sqrt(-torch.expm1(la))
        if self.name == "ve":
            return torch.ones_like(t), float(self.params.get("sigma_max", 80.0)) * t
        # ddpm: log abar linear between t_k = k / T
        idx = torch.clamp(torch.searchsorted(self._ts, t.detach(), right=True) - 1, 0, len(self._ts) - 2)
        t0, t1 = self._ts[idx], self._ts[idx + 1]
        l0, l1 = self._la[idx], self._la[idx + 1]
        la = l0 + (l1 - l0) * (t - t0) / (t1 - t0)
        return torch.exp(0.5 * la), torch.sqrt(-torch.expm1(la))

    def derivatives(self, t: torch.Tensor):
        """(alpha, sigma, dalpha/dt, dsigma/dt) elementwise."""
        a, s = self.alpha_sigma(t)
        tf = torch.clamp(t, min=self.deriv_floor) if self.deriv_floor > 0 else t
        tf = tf.to(torch.float32)
        _, (da, ds) = torch.func.jvp(self.alpha_sigma, (tf,), (torch.ones_like(tf),))
        return a, s, da, ds


def _b(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.reshape(v.shape + (1,) * (x.ndim - 1))


def _floor(d: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return torch.where(d.abs() < eps, torch.where(d < 0, -eps, eps) * torch.ones_like(d), d)


def to_x0_eps(path: Path, pred: torch.Tensor, kind: str, x: torch.Tensor, t: torch.Tensor):
    """(x0, eps) of a prediction of `kind` ("x0", "eps", "flow", "v") at (x, t (B,))."""
    a, s, da, ds = (_b(v, x) for v in path.derivatives(t))
    if kind == "x0":
        return pred, (x - a * pred) / _floor(s)
    if kind == "eps":
        return (x - s * pred) / _floor(a), pred
    if kind == "flow":
        det = a * ds - s * da
        return (ds * x - s * pred) / det, (a * pred - da * x) / det
    if kind == "v":
        n2 = a * a + s * s
        return (a * x - s * pred) / n2, (s * x + a * pred) / n2
    raise ValueError(f"unknown prediction kind {kind!r}; expected x0, eps, flow or v")


def to_velocity(path: Path, pred: torch.Tensor, kind: str, x: torch.Tensor, t: torch.Tensor):
    if kind == "flow":
        return pred
    x0, eps = to_x0_eps(path, pred, kind, x, t)
    _, _, da, ds = (_b(v, x) for v in path.derivatives(t))
    return da * x0 + ds * eps


# ---- flow map and samplers --------------------------------------------------------------------
def flow_map(net: Network, path: Path, form: str, prediction: str, x, t, s) -> torch.Tensor:
    """G(x, t, s) with t, s of shape (B,); G(x, t, t) = x exactly."""
    pred = net(x, t, s).to(torch.float32)
    if form == "euler":
        return x + _b(s - t, x) * to_velocity(path, pred, prediction, x, t)
    if form == "semilinear":
        x0, eps = to_x0_eps(path, pred, prediction, x, t)
        a_s, s_s = path.alpha_sigma(s)
        return torch.where(_b(s == t, x), x, _b(a_s, x) * x0 + _b(s_s, x) * eps)
    raise ValueError(f"unknown student form {form!r}; expected 'euler' or 'semilinear'")


def renoise(path: Path, x: torch.Tensor, s: torch.Tensor, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Forward-diffuse x at time s to time t >= s on the path: keeps the path's marginals."""
    a_s, sig_s = path.alpha_sigma(s)
    a_t, sig_t = path.alpha_sigma(t)
    r = a_t / a_s
    std = torch.sqrt(torch.clamp(sig_t**2 - (r * sig_s) ** 2, min=0.0))
    return _b(r, x) * x + _b(std, x) * z


@torch.no_grad()
def sample(
    net: Network,
    noise: torch.Tensor,
    grid: Sequence[float],
    *,
    path: Path,
    form: str = "euler",
    prediction: str = "flow",
    gamma: float = 0.0,
    renoise_noise: Sequence[torch.Tensor] | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Chain of flow-map jumps over `grid` (decreasing, e.g. [1, 0.5, 0]) from x = noise.

    With gamma > 0, step i lands at s' = (1 - gamma) grid[i+1] and is re-noised to grid[i+1]
    with `renoise_noise[i]` (or fresh normal noise from `generator`), except on the last step.
    """
    grid = [float(g) for g in grid]
    if len(grid) < 2 or any(a <= b for a, b in itertools.pairwise(grid)):
        raise ValueError(f"grid must be strictly decreasing with >= 2 points, got {grid}")
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must lie in [0, 1], got {gamma}")
    x = noise.to(torch.float32)
    full = lambda v: torch.full((x.shape[0],), v, dtype=torch.float32, device=x.device)
    for i, (t, t_next) in enumerate(itertools.pairwise(grid)):
        last = i == len(grid) - 2
        s = t_next if last else (1.0 - gamma) * t_next
        x = flow_map(net, path, form, prediction, x, full(t), full(s))
        if not last and gamma > 0:
            if renoise_noise is not None:
                z = renoise_noise[i].to(x)
            else:
                z = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
            x = renoise(path, x, full(s), full(t_next), z)
    return x


def network_fn(
    model: torch.nn.Module, cfg: dict[str, Any], label=None, guidance=None, num_steps=None
) -> Network:
    """net(x, t, s) of an exported model with its config (time offset, s-conditioning)."""
    uses_s = bool(cfg.get("uses_s", False))
    scale = float(cfg["model"].get("time_scale", 1000.0))
    # the network sees t * time_scale + time_offset (time_offset = -1: DDPM index k = t T - 1)
    offset = float(cfg.get("time_offset", 0.0)) / scale

    def net(x, t, s):
        kw = {"s": s + offset} if uses_s else {}
        return model(x, t + offset, label=label, guidance=guidance, num_steps=num_steps, **kw)

    return net


def sample_exported(
    model: torch.nn.Module,
    cfg: dict[str, Any],
    noise: torch.Tensor,
    *,
    grid: Sequence[float] | None = None,
    gamma: float | None = None,
    **kwargs: Any,
) -> torch.Tensor:
    """Sample an exported student with its recommended sampler (fewstep.json "sampler")."""
    rec = cfg.get("sampler") or {}
    grid = grid if grid is not None else rec.get("grid")
    if grid is None:
        raise ValueError("no time grid given and fewstep.json has no recommended sampler grid")
    gamma = float(rec.get("gamma", 0.0)) if gamma is None else gamma
    cond = {k: kwargs.pop(k) for k in ("label", "guidance", "num_steps") if k in kwargs}
    return sample(
        network_fn(model, cfg, **cond),
        noise,
        grid,
        path=Path(**cfg["path"]),
        form=cfg.get("student_form", "euler"),
        prediction=cfg["prediction"],
        gamma=gamma,
        **kwargs,
    )
