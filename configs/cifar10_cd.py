"""Consistency distillation (CD) of the CIFAR-10 VP teacher (docs/methods.md §5.2).

python -m fewstep_jax.main --config=configs/cifar10_cd.py --workdir=runs/cifar10_cd
python -m fewstep_jax.modes.dryrun --config=configs/cifar10_cd.py

Teacher: configs/cifar10_vp_teacher.py (runs/cifar10_vp_teacher). Recipe of CM's
cifar10_ve_cd: EDM grid N = 18, Heun teacher (2 NFE per jump), target = current params under
stop-gradient (no target EMA), eval EMA 0.9999, batch 512, RAdam lr 4e-4 with 10^7/512 ~ 19.5k
warm-up steps, no grad-clip, dropout 0, 800k steps. Distance L2 (LPIPS is not shipped).
Mesh: one 8-accelerator host, data=8, fsdp=1 (64 images per device).
"""

from fewstep_jax.recipes import apply_recipe, experiments


def get_config():
    c = experiments.cifar10_vp_student_base()
    apply_recipe(c, "cd")
    c.train.num_steps = 800_000
    c.train.batch_size = 512
    c.optim.name = "radam"
    c.optim.lr = 4e-4
    c.optim.warmup_steps = 19_531
    c.optim.grad_clip = 0.0
    c.ema.decay = 0.9999
    c.ema.target_decay = -1.0
    c.sampler.grid = "edm"
    return c
