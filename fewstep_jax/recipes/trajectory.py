"""Trajectory-family recipes: TraFlow (+ ablations), CD, CTM, shortcut, mean-flow, reflow
(docs/methods.md §2, 5).

Tuned on the exact gmm8 testbed at its equal budget (2000 steps, batch 256, fresh student) with
the flow-map MSE against the exact ``Phi(x, 1, 0)``; see bench_results/distill_trajectory.md.
TraFlow (1 NFE, flow-map MSE): CTM-like defaults N = 18, K = 17, lam_vel = 1, target EMA 0.999
gave 0.48; K = N = 18 with 2 Heun substeps 0.39; the settings below 0.0135 with lam_vel = 0.1
and 0.0045 with lam_vel = 0 (teacher Euler at 8 NFE: 0.0022). Choices shared by the grid-based
recipes (TraFlow and CTM get the same ones, so the comparison is fair), and why:

* ``num_grid = max_jump = 8``: with a fresh student (analytic teachers have no params to copy)
  the 1-NFE map ``G(x, 1, 0)`` is only learnt when the reconstruction term sees whole-range jumps
  often; CTM's K = N - 1 on 18 points never reconstructs the full jump and rarely a long one.
* ``substeps = 4``: the teacher target of a jump is a k * 4-step Heun solve, so the long-jump
  targets are not limited by their own discretisation error. On the image testbeds 1: the jump
  solve is padded to ``max_jump * substeps`` Heun steps for every sample (one batched scan), so
  4 would cost 64 teacher evaluations per example per step, 17 with 1.
* target EMA 0.99: at a few thousand steps CTM's 0.999 target lags the online network.
* jumps: the start first (``n ~ U{1..N}``), then ``k ∝ k`` among the jumps that fit
  (``jump_sampler="start_first"``), not CTM's own sampler (one ``k ∝ k`` per batch, then the start:
  recipe ``traflow_ctm_sampler``; the ``ctm`` recipe uses CTM's). Measured on gmm8 at 2000 steps
  (``python -m fewstep_jax.bench.distill --testbeds=gmm8 --recipes=traflow,traflow_start_first
  --steps=2000``, before the rename; flow-map MSE at 1 / 2 / 4 / 8 NFE), seed 0: CTM's sampler
  0.00395 / 0.00503 / 0.00659 / 0.0196, start-first 0.00453 / 0.00314 / 0.0066 / 0.00844; seed 1:
  0.00319 / 0.00414 / 0.00599 / 0.0174 against 0.00365 / 0.00214 / 0.00313 / 0.0038. CTM's long
  jumps gain ~13 % at 1 NFE and lose 1.6-4.6x at 2-8 NFE (its chains get worse with more steps),
  so TraFlow keeps the start-first sampler.
* ``lam_vel = 0.01``: variant A pulls the average velocity of every jump towards the teacher's
  instantaneous velocity, i.e. the 1-NFE map towards one Euler step (the data mean); on a curved
  teacher it costs 1-NFE quality in proportion to its weight (ablation rows vel0 / 0.1 / 1).

Deliberate variants of the baselines' papers (docs/methods.md §5), kept and labelled:

* CD [deliberate variant]: an Euler-form student read at ``s = 0``, ``G(x, t, 0) = x - t g``, whose
  boundary ``G(x, 0, 0) = x`` is exact by construction, instead of CM's EDM ``c_skip / c_out``
  parameterisation with ``t_min = 0.002``.
* L2 where the papers use LPIPS [deliberate variant]: CD, CTM and one-step reflow distillation
  (``reflow_distill``) train with the squared distance (LPIPS is not shipped; docs/methods.md §1.3).
* CTM has no GAN term and no DSM term by default (``lam_dsm = 0``).

Reflow (docs/methods.md §5.1) trains on teacher (noise, sample) pairs (``student.data = "pairs"``: generated
once into ``<workdir>/pairs.npz`` by the distill loop and reused on resume):

* ``reflow``: 2-RF, flow matching on the pairs; an s-agnostic velocity, so its k-NFE sampler is
  k Euler steps of the reflowed flow.
* ``reflow_distill``: one-step distillation on the pairs, ``d(G(noise, 1, 0), x)``. With the
  testbed's teacher this is 1-RF + distill; with ``--config.teacher.workdir=<a reflow run>`` the
  pairs come from the reflowed flow: 2-RF + distill (the RF paper's recipe).
"""

_LOWDIM = ("gmm8", "checker", "gmm_hd")


def _euler_student(c, uses_s=True):
    c.student.form = "euler"
    c.student.prediction = "flow"
    c.model.use_s = uses_s
    c.student.data = "data"
    # the 8-NFE rows let a table compare a 1-NFE student with the teacher's 8-step solvers
    c.sampler.nfes = (1, 2, 4, 8)


def _grid(c) -> str:
    return "uniform" if c.testbed.path == "rf" else "edm"


def _substeps(c) -> int:
    return 4 if c.testbed.name in _LOWDIM else 1


def traflow(
    c, vel_variant="A", lam_vel=0.01, uses_s=True, jump_weighting="linear", jump_sampler="start_first"
):
    _euler_student(c, uses_s)
    c.losses.traflow = {
        "weight": 1.0,
        "vel_variant": vel_variant,
        "lam_vel": lam_vel,
        "jump_weighting": jump_weighting,
        "jump_sampler": jump_sampler,
        "num_grid": 8,
        "max_jump": 8,
        "substeps": _substeps(c),
        "grid": _grid(c),
    }
    c.ema.target_decay = 0.99


def cd(c):
    _euler_student(c, uses_s=False)
    c.losses.cd = {"weight": 1.0, "grid": _grid(c), "num_grid": 18, "solver": "heun", "distance": "l2"}


def ctm(c):
    _euler_student(c)
    c.losses.ctm = {
        "weight": 1.0,
        "lam_dsm": 0.0,
        "jump_sampler": "ctm",  # sony/ctm: one k ∝ k per batch, then the start among those that fit
        "num_grid": 8,
        "max_jump": 8,
        "substeps": _substeps(c),
        "grid": _grid(c),
    }
    c.ema.target_decay = 0.99


def shortcut(c):
    _euler_student(c)
    c.losses.shortcut = {"weight": 1.0, "denoise_timesteps": 128, "bootstrap_every": 8}
    c.ema.target_decay = 0.999


def meanflow(c):
    _euler_student(c)
    c.losses.meanflow = {"weight": 1.0, "velocity": "teacher", "equal_fraction": 0.75}


def teacher_pairs(c) -> None:
    """Train on teacher (noise, sample) pairs generated once into ``<workdir>/pairs.npz``."""
    c.student.data = "pairs"
    num = 20_000 if c.testbed.name in _LOWDIM else 4_000
    c.student.pairs = {"num": num, "solver": "heun", "steps": 32, "batch_size": 1000}


def reflow(c):
    _euler_student(c, uses_s=False)
    teacher_pairs(c)
    c.losses.reflow = {"weight": 1.0}


def reflow_distill(c):
    _euler_student(c, uses_s=False)
    teacher_pairs(c)
    c.losses.reflow_distill = {"weight": 1.0, "num_steps": 1, "distance": "l2"}
    c.sampler.nfes = (1,)  # trained for the single jump 1 -> 0 only


RECIPES = {
    "traflow": traflow,
    "traflow_velB": lambda c: traflow(c, vel_variant="B", lam_vel=0.1),  # vs traflow_vel0.1 (A)
    "traflow_vel0": lambda c: traflow(c, lam_vel=0.0),
    "traflow_vel0.1": lambda c: traflow(c, lam_vel=0.1),
    "traflow_vel1": lambda c: traflow(c, lam_vel=1.0),
    "traflow_no_s": lambda c: traflow(c, uses_s=False),
    # jumps k ~ U{1..n} instead of p(k) ∝ k: more short jumps, the ones a multi-step chain makes
    "traflow_uniform": lambda c: traflow(c, jump_weighting="uniform"),
    # CTM's jump sampler (one k ∝ k per batch, then the start) instead of the start first
    "traflow_ctm_sampler": lambda c: traflow(c, jump_sampler="ctm"),
    "cd": cd,
    "ctm": ctm,
    "shortcut": shortcut,
    "meanflow": meanflow,
    "reflow": reflow,
    "reflow_distill": reflow_distill,
}
