"""The embedded default run (the README's first command): offline, CPU, a few minutes.

Today: the teacher-solver table on the 2-D 8-Gaussian testbed (exact analytic teacher), the
baseline every few-step student is measured against. It grows into the full pipeline (teacher ->
students of every method -> report) as the method issues land.

fewstep --config=configs/default.py --workdir=runs/default
"""

from configs import base


def get_config():
    c = base.get_config()
    c.mode = "evaluate"
    c.testbed.name = "gmm8"
    c.eval.num_samples = 2000
    return c
