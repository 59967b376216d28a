"""Distribution-matching recipes: TDM (K = 4, 1, 2, steps-aware) and the DMD / DMD2 baselines.

Generator = the student, data-free (``student.data = "noise"``); an aux network ``fake`` (the
fake score) tracks the generator's distribution with its own optimizer (docs/methods.md §4.3 / 5.5).
Each method keeps its own paper's training setup:

* TDM (the official demo, ``train_tdm_demo.py``): both optimizers Adam with betas (0, 0.95) (the
  demo's AdamW betas; no weight decay on the small toy networks), the fake's lr 5x the
  generator's, the fake updated first in every step and the generator on the updated fake;
* DMD / DMD2 (``tianweiy/DMD2`` ``train_edm.py``, ``edm_guidance.py``): both optimizers AdamW
  (0.9, 0.999) with weight decay 0.01 and the same lr (the testbed's generator lr, 1/5 of its
  base lr as TDM's generator), grad-clip 10, the generator updated first and the fake on the
  generator's pre-update samples (``aux_nets.fake.order = "after_main"``), noise levels uniform
  over the indices of DMD2's 1000-point Karras grid (generator 20..980, fake 0..999;
  ``time_sampler = "karras"``). Measured on gmm8 (2000 steps, 1 NFE, SW2 / MMD): ``dmd`` 0.239 /
  0.0224, ``dmd2`` 0.223 / 0.0133; with TDM's setup (the labelled variants ``dmd_tdm_setup``,
  ``dmd2_tdm_setup``, these recipes before issue 16) 0.134 / 0.0045 and 0.197 / 0.0069;
* the student is ``semilinear`` (``G(x, t, s) = alpha_s x0 + sigma_s eps``: TDM's deterministic
  DDIM step; identical to Euler on the rectified-flow path) and has no ``s`` input;
* the fake score is the student's network without ``s`` (same ``num_step_classes``), initialised
  from a network teacher (``config.teacher.workdir``) when there is one;
* an analytic teacher has no network to copy into the fake score, so the fake trains alone for
  the first ``train.main_start`` steps on the fresh student's samples (fake warm-up) before the
  generator starts; with a network teacher set ``--config.train.main_start=0``. The warm-up is
  part of the step budget (every recipe of a table trains the same number of steps).
* TDM's student times [deliberate variant]: ``total_steps = 1000`` so that on a DDPM path the K
  steps start at t = 1, .75, .5, .25 (K = 4), the student sampler's uniform grid (the demo's
  ``--total_steps 900`` starts at 0.9); no effect on continuous paths. Also a variant of the
  demo: the fake's importance weight ``w_IS`` is computed in log space and clipped to ±10
  (docs/methods.md pitfall 13; the demo takes the ratio of exponentials unclipped).
* ``tdm*`` use the demo's elementwise pseudo-Huber (c = 1e-3: for gaps much larger than c its
  gradient is the *sign* of each coordinate's DM gap), ``tdm*_l2`` the squared distance (the
  gradient is the gap itself); the README's DM tables compare the two.
* DMD / DMD2 are one-step generators (``sampler.nfes = (1,)``); DMD2 = DMD with TTUR
  (generator every 5th step, ``train.main_every``): the pure distribution-matching part.
  ``dmd_reg`` is DMD v1: plus the regression ``mean|G(z) - Phi_teacher(z)|^2`` on teacher pairs
  generated once (``student.data = "pairs"``, as reflow), L2 where the paper has LPIPS
  [deliberate variant]; it keeps DMD2's optimiser and update order. DMD2's GAN head (it needs
  real data) is not built.
"""

import ml_collections

from fewstep_jax.recipes.trajectory import teacher_pairs

WARMUP_FRACTION = 0.1  # fake-only steps of an analytic-teacher run, fraction of the budget
FAKE_LR_RATIO = 5.0  # TDM: fake lr / generator lr
BETAS = (0.0, 0.95)  # TDM's AdamW betas
TDM_TOTAL_STEPS = 1000
# DMD2 (train_edm.py): AdamW (0.9, 0.999), weight decay 0.01, the same lr for both networks,
# max_grad_norm 10; noise levels on its Karras grid (indices 20..980 for the generator, all for the fake)
DMD2_BETAS = (0.9, 0.999)
DMD2_WEIGHT_DECAY = 0.01
DMD2_GRAD_CLIP = 10.0
DMD2_TIMES = {"time_sampler": "karras", "t_min": 0.02, "t_max": 0.98}
DMD2_FAKE_TIMES = {"time_sampler": "karras", "t_min": 0.0, "t_max": 1.0}


def _dm_common(c, fake_losses: dict, prediction: str = "flow", setup: str = "tdm") -> None:
    """The shared generator / fake-score setup; ``setup`` is the method's own training setup
    (``"tdm"``: TDM's demo, ``"dmd2"``: DMD2's; module doc)."""
    c.student.form = "semilinear"
    c.student.prediction = prediction
    c.student.data = "noise"
    c.model.use_s = False
    # the generator's lr: 1/5 of the testbed's, TDM's ratio (the fake gets 5x it in TDM, 1x in DMD2)
    c.optim.lr = float(c.optim.lr) / FAKE_LR_RATIO
    c.optim.schedule = "constant"
    if setup == "tdm":
        c.optim.b1, c.optim.b2 = BETAS
        fake_optim = {"lr": float(c.optim.lr) * FAKE_LR_RATIO, "b1": BETAS[0], "b2": BETAS[1]}
        order = "first"  # the demo: fake step, then the generator on the updated fake
    elif setup == "dmd2":
        c.optim.name = "adamw"
        c.optim.b1, c.optim.b2 = DMD2_BETAS
        c.optim.weight_decay = DMD2_WEIGHT_DECAY
        c.optim.grad_clip = DMD2_GRAD_CLIP
        fake_optim = {"lr": float(c.optim.lr), "b1": DMD2_BETAS[0], "b2": DMD2_BETAS[1]}
        order = "after_main"  # train_edm.py: generator step, then the fake on its pre-update samples
    else:
        raise ValueError(f"unknown distribution-matching setup {setup!r}; expected 'tdm' or 'dmd2'")
    fake_model = ml_collections.ConfigDict(c.model.to_dict())
    c.aux_nets.fake = {
        "model": fake_model,
        "losses": fake_losses,
        "optim": fake_optim,
        "update_every": 1,
        "order": order,
        "init_from_teacher": True,
        "prediction": prediction,
    }
    c.train.main_start = int(WARMUP_FRACTION * int(c.train.num_steps))
    c.sampler.grid = "uniform"
    c.sampler.gammas = (0.0,)


def tdm(c, num_steps=(4,), distance: str = "pseudo_huber") -> None:
    """TDM with K in ``num_steps`` (one K, or several: the sampling-steps-aware TDM-unify).

    ``distance``: the demo's elementwise pseudo-Huber (c = 1e-3), or ``l2`` (the demo's other
    branch; the ``*_l2`` recipes), whose gradient keeps the size of each coordinate's DM gap.
    """
    ks = tuple(int(k) for k in num_steps)
    if len(ks) > 1:
        c.model.num_step_classes = len(ks)
    sched = {"num_steps": ks, "total_steps": TDM_TOTAL_STEPS, "interval": "separate"}
    _dm_common(c, {"tdm_fake": {"weight": 1.0, **sched}})
    c.losses.tdm = {"weight": 1.0, **sched, "distance": distance}
    c.sampler.nfes = tuple(sorted(set(ks) | {1, 2, 4})) if len(ks) > 1 else (1, 2, 4)


def dmd(c, main_every: int = 1, setup: str = "dmd2") -> None:
    """One-step DMD generator (DMD2 with ``main_every = 5``), no regression / GAN terms, with
    DMD2's training setup (module doc); ``setup="tdm"``: the labelled variant with TDM's setup and
    the terms' uniform-in-t noise levels (these recipes before issue 16)."""
    if setup == "dmd2":
        _dm_common(c, {"dmd_fake": {"weight": 1.0, **DMD2_FAKE_TIMES}}, setup="dmd2")
        c.losses.dmd = {"weight": 1.0, **DMD2_TIMES}
    else:
        _dm_common(c, {"dmd_fake": {"weight": 1.0}}, setup=setup)
        c.losses.dmd = {"weight": 1.0}
    c.train.main_every = main_every
    c.sampler.nfes = (1,)


def dmd_reg(c, reg_weight: float = 0.25) -> None:
    """DMD v1: the one-step DMD generator plus the regression on teacher pairs."""
    dmd(c)
    teacher_pairs(c)
    c.losses.dmd.reg_weight = reg_weight


_TDM_STEPS = {"tdm": (4,), "tdm_k1": (1,), "tdm_k2": (2,), "tdm_unify": (1, 2, 4)}

RECIPES = {
    **{name: (lambda c, ks=ks: tdm(c, ks)) for name, ks in _TDM_STEPS.items()},
    **{f"{name}_l2": (lambda c, ks=ks: tdm(c, ks, "l2")) for name, ks in _TDM_STEPS.items()},
    "dmd": dmd,
    "dmd2": lambda c: dmd(c, main_every=5),
    # labelled variants: DMD / DMD2 with TDM's training setup (Adam (0, 0.95), fake lr 5x, fake first,
    # t ~ U[0.02, 0.98] / U[0.001, 0.999]), as these recipes were before issue 16
    "dmd_tdm_setup": lambda c: dmd(c, setup="tdm"),
    "dmd2_tdm_setup": lambda c: dmd(c, main_every=5, setup="tdm"),
    "dmd_reg": dmd_reg,
}
