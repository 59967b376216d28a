"""Latent-consistency-style distillation (LCM, pixel space) of the CIFAR-10 VP teacher
(METHODS.md 5.3).

python -m fewstep_jax.main --config=configs/cifar10_lcm.py --workdir=runs/cifar10_lcm
python -m fewstep_jax.dryrun --config=configs/cifar10_lcm.py

Teacher: configs/cifar10_vp_teacher.py (runs/cifar10_vp_teacher). Student: the teacher's UNet
(no s-branch) in eps-prediction with LCM's boundary scalings (timestep scaling 10) on the
50-point DDIM grid (skipping step 20); no guidance (unconditional). Recipe (diffusers LCM
full-model script): target EMA 0.95, AdamW wd 1e-2, grad-clip 1, constant lr after 500 warm-up
steps, per-device batch 12; lr 1e-4 instead of SD's 1e-6 (as configs/cifar10_tcd.py).
Sampler: LCM multistep = TCD's SSS with gamma 1. Mesh: one 8-accelerator host, data=8, fsdp=1.
"""

from configs import cifar10_vp_teacher
from configs.cifar10_rf_teacher import student_base


def get_config():
    c = student_base(
        "configs/cifar10_vp_teacher.py", "runs/cifar10_vp_teacher", cifar10_vp_teacher.get_config
    )
    c.method = "lcm"
    c.student.form = "semilinear"
    c.student.prediction = "eps"
    c.model.use_s = False
    c.losses.lcm = {"weight": 1.0, "num_ddim_timesteps": 50, "target": "ema", "distance": "l2"}
    c.train.num_steps = 100_000
    c.train.batch_size = 96
    c.optim.name = "adamw"
    c.optim.lr = 1e-4
    c.optim.weight_decay = 1e-2
    c.optim.warmup_steps = 500
    c.optim.grad_clip = 1.0
    c.ema.decay = 0.9999
    c.ema.target_decay = 0.95
    c.sampler.grid = "ddpm_leading"
    c.sampler.kind = "tcd"
    c.sampler.gammas = (1.0,)
    return c
