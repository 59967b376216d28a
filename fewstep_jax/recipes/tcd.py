"""TCD and LCM recipes on a VP (DDPM) teacher (docs/methods.md §3, 5.3; losses/tcd.py).

Both distil the teacher's DDIM solver with skipping step 20 on the 50-point grid ``20 i - 1``,
use the LCM/TCD target EMA 0.95 and sample on the times they were trained at (the ``tcd`` grid,
``TCDScheduler.set_timesteps``). The student is semi-linear (``alpha_s x0 + sigma_s eps``, TCF(1))
with no ``s`` input: its ``s``-dependence is analytic. Testbeds default to the rectified-flow
path, which TCD is not defined for, so these recipes move an ``rf`` testbed to the ``ddpm`` path
(Stable Diffusion's scaled_linear schedule); any other path given on the command line is kept.

* ``tcd``: TCF(1), sampled with strategic stochastic sampling at gamma 0, 0.2, 0.3, 0.5, 1.
* ``lcm``: LCM's boundary-scaled consistency to data, sampled multistep (gamma 1).
* ``tcd_s``: TCF(1) whose network also sees the target time ``s`` (the zero-initialised s-branch of
  the flow-map students, so a student initialised from a teacher starts exactly as ``tcd``): our
  extension, not in the paper. One s-agnostic x0/eps pair must serve every jump in ``tcd``; with
  ``s`` the 1-step jump to the data gets its own prediction (where ``tcd`` loses to LCM).
* ``tcd2``: TCF(2) (second-order exponential integrator, two student calls per target).
* ``tcd_huber``: TCD with the elementwise pseudo-Huber distance (c = 1e-3).
* ``tcd_cfg`` / ``tcd_s_cfg`` / ``lcm_cfg``: class-conditional students distilled from the guided teacher,
  ``w ~ U[0, 2]`` in LCM form (Imagen scale ``1 + w``) given to the student as its guidance input.
"""

TCD_GAMMAS = (0.0, 0.2, 0.3, 0.5, 1.0)
GUIDANCE_RANGE = (0.0, 2.0)  # LCM-form w; the papers' [2, 14] / [5, 15] fit text-to-image, not 8 modes
NUM_CLASSES = {"gmm8": 8, "checker": 8, "gmm_hd": 6, "digits": 10, "mnist": 10}


def _vp_student(c, prediction="v"):
    if c.testbed.path == "rf":
        c.testbed.path = "ddpm"
    c.student.form = "semilinear"
    # v keeps a fresh (zero-output) network's x0 and eps bounded at every t; eps would start at
    # x0 = x / alpha_t (x15 at t = 1 on scaled_linear)
    c.student.prediction = prediction
    c.student.data = "data"
    c.model.use_s = False
    c.ema.target_decay = 0.95
    c.sampler.grid = "tcd"
    c.sampler.kind = "tcd"
    c.sampler.nfes = (1, 2, 4, 8)
    # the teacher's solver rows on the same times (on the DDPM path the EDM grid made Heun and
    # DPM++(2M) diverge at 4 and 8 NFE)
    c.eval.grid = "tcd"


def _guided(c, term: dict) -> None:
    name = c.testbed.name
    if name not in NUM_CLASSES:
        raise ValueError(
            f"guided TCD/LCM recipes need a labelled testbed, got {name!r}; known {sorted(NUM_CLASSES)}"
        )
    c.model.num_classes = NUM_CLASSES[name]
    c.model.use_guidance = True
    term.update(w_min=GUIDANCE_RANGE[0], w_max=GUIDANCE_RANGE[1], guidance_embed=True)


def tcd(c, order=1, distance="l2", guided=False, use_s=False):
    _vp_student(c)
    c.model.use_s = use_s
    term = {"weight": 1.0, "num_ddim_timesteps": 50, "tcf_order": order, "distance": distance}
    if guided:
        _guided(c, term)
    c.losses.tcd = term
    c.sampler.gammas = TCD_GAMMAS


def lcm(c, guided=False):
    _vp_student(c)
    term = {"weight": 1.0, "num_ddim_timesteps": 50, "distance": "l2"}
    if guided:
        _guided(c, term)
    c.losses.lcm = term
    c.sampler.gammas = (1.0,)


RECIPES = {
    "tcd": tcd,
    "lcm": lcm,
    "tcd_s": lambda c: tcd(c, use_s=True),
    "tcd_s_cfg": lambda c: tcd(c, guided=True, use_s=True),
    "tcd2": lambda c: tcd(c, order=2),
    "tcd_huber": lambda c: tcd(c, distance="huber"),
    "tcd_cfg": lambda c: tcd(c, guided=True),
    "lcm_cfg": lambda c: lcm(c, guided=True),
}
