"""The embedded default run (the README's first command): the whole job, offline, on a CPU.

Mode ``pipeline`` (fewstep_jax/modes/pipeline.py) on the 2-D 8-Gaussian testbed with its exact
analytic teacher: one few-step student per method of ``pipeline.methods`` that has a recipe
(fewstep_jax/recipes: TraFlow, TCD, TDM), each trained ``pipeline.steps`` steps in
``<workdir>/<method>/``, then one report in the workdir: ``report.md`` (the students at NFE 1/2/4
beside the teacher's solvers at the same NFE and the converged teacher), ``samples.png``,
``trajectories.png``, ``loss_curves.png`` and ``pipeline.json``. A second run on the same
workdir skips the stages already done and resumes an interrupted one from its checkpoint.

fewstep --config=configs/default.py --workdir=runs/default

Measured (2000 steps per method, all three methods; jax 0.10.2 on an idle 2-core CPU machine,
the batch split over 2 XLA:CPU devices by ``--cpu_devices`` auto): 171 s wall and 239 s CPU time
for the whole command, Python/JAX start-up and every compilation included; well inside the
10-minute budget.
"""

import ml_collections

from fewstep_jax.recipes import base


def get_config():
    c = base.get_config()
    c.mode = "pipeline"
    c.testbed.name = "gmm8"
    c.testbed.path = "rf"  # the TCD / LCM recipes move their students to the ddpm path
    c.eval.num_samples = 2000
    c.sampler.nfes = (1, 2, 4)  # the NFEs of the table and the sample grids

    c.pipeline = ml_collections.ConfigDict()
    # recipes (fewstep_jax/recipes) to distil, in order; names without a recipe yet are skipped
    c.pipeline.methods = ("traflow", "tcd", "tdm")
    c.pipeline.steps = 0  # student steps per method; 0: the testbed budget (2000 for gmm8)
    c.pipeline.batch_size = 0  # 0: the testbed's batch (fewstep_jax/recipes/testbeds.py)
    c.pipeline.teacher_solvers = ("euler", "heun", "dpmpp_2m")
    c.pipeline.trajectory_samples = 300  # noise samples drawn in trajectories.png
    return c
