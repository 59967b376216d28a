"""Consistency trajectory model (CTM, without GAN and DSM) of the CIFAR-10 VP teacher
(docs/methods.md §5.4).

python -m fewstep_jax.main --config=configs/cifar10_ctm.py --workdir=runs/cifar10_ctm
python -m fewstep_jax.modes.dryrun --config=configs/cifar10_ctm.py

Teacher: configs/cifar10_vp_teacher.py (runs/cifar10_vp_teacher). Method: the ``ctm`` recipe
(fewstep_jax/recipes/trajectory.py: EDM grid of 8 intervals, jumps up to 8, 4 Heun substeps; CTM's
N = 18, K = 17 is ``--config.losses.ctm.num_grid=18 --config.losses.ctm.max_jump=17``). CTM
CIFAR-10 numbers: soft consistency through the target EMA 0.999, eval EMA 0.9999, Adam lr 4e-4,
global batch 128, distance L2 (LPIPS is not shipped). Mesh: one 8-accelerator host, data=8, fsdp=1.
"""

from fewstep_jax.recipes import apply_recipe, experiments


def get_config():
    c = experiments.cifar10_vp_student_base()
    apply_recipe(c, "ctm")
    c.train.num_steps = 200_000
    c.train.batch_size = 128
    c.optim.name = "adam"
    c.optim.lr = 4e-4
    c.optim.warmup_steps = 1000
    c.ema.decay = 0.9999
    c.ema.target_decay = 0.999
    c.sampler.grid = "edm"
    return c
