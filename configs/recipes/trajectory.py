"""Trajectory-family recipes: TraFlow (+ ablations), CD, CTM, shortcut, mean-flow (METHODS 2, 5)."""


def _euler_student(c, uses_s=True):
    c.student.form = "euler"
    c.student.prediction = "flow"
    c.model.use_s = uses_s
    c.student.data = "data"


def traflow(c, vel_variant="A", lam_vel=1.0, uses_s=True):
    _euler_student(c, uses_s)
    grid = "uniform" if c.testbed.path == "rf" else "edm"
    c.losses.traflow = {
        "weight": 1.0,
        "vel_variant": vel_variant,
        "lam_vel": lam_vel,
        "num_grid": 18,
        "max_jump": 17,
        "grid": grid,
    }
    c.ema.target_decay = 0.999


def cd(c):
    _euler_student(c, uses_s=False)
    c.losses.cd = {"weight": 1.0, "grid": "edm", "num_grid": 18, "solver": "heun", "distance": "l2"}


def ctm(c):
    _euler_student(c)
    c.losses.ctm = {"weight": 1.0, "lam_dsm": 0.0}
    c.ema.target_decay = 0.999


def shortcut(c):
    _euler_student(c)
    c.losses.shortcut = {"weight": 1.0, "denoise_timesteps": 128, "bootstrap_every": 8}
    c.ema.target_decay = 0.999


def meanflow(c):
    _euler_student(c)
    c.losses.meanflow = {"weight": 1.0, "velocity": "teacher", "equal_fraction": 0.75}


RECIPES = {
    "traflow": traflow,
    "traflow_velB": lambda c: traflow(c, vel_variant="B"),
    "traflow_vel0": lambda c: traflow(c, lam_vel=0.0),
    "traflow_vel0.1": lambda c: traflow(c, lam_vel=0.1),
    "traflow_no_s": lambda c: traflow(c, uses_s=False),
    "cd": cd,
    "ctm": ctm,
    "shortcut": shortcut,
    "meanflow": meanflow,
}
