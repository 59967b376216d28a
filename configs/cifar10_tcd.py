"""Trajectory consistency distillation (TCD) of the CIFAR-10 VP teacher (METHODS.md 3.2).

python -m fewstep_jax.main --config=configs/cifar10_tcd.py --workdir=runs/cifar10_tcd
python -m fewstep_jax.dryrun --config=configs/cifar10_tcd.py

Teacher: configs/cifar10_vp_teacher.py (runs/cifar10_vp_teacher; ddpm path, eps). Student:
semi-linear TCF(1) in eps-prediction with the s-branch (t_m), initialised from the teacher.
Grid: the 50-point DDIM solver grid t_i = 20 i - 1 (skipping step 20). Unconditional CIFAR-10:
no guidance (w = 0). Recipe (full-model TCD/LCM scripts): target EMA 0.95, AdamW (0.9, 0.999)
wd 1e-2, grad-clip 1, constant lr with 500 warm-up steps, per-device batch 12 (global 96 on 8).
The scripts' lr 4e-6 was tuned for Stable Diffusion fine-tuning; for a 58.7M CIFAR UNet we use
the CM/CTM 1e-4 order (an assumption). Mesh: one 8-accelerator host, data=8, fsdp=1.
"""

from configs import cifar10_vp_teacher
from configs.cifar10_rf_teacher import student_base


def get_config():
    c = student_base(
        "configs/cifar10_vp_teacher.py", "runs/cifar10_vp_teacher", cifar10_vp_teacher.get_config
    )
    c.method = "tcd"
    c.student.form = "semilinear"
    c.student.prediction = "eps"
    c.model.use_s = True
    c.losses.tcd = {"weight": 1.0, "num_ddim_timesteps": 50, "target": "ema", "distance": "l2"}
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
    c.sampler.gammas = (0.2,)
    return c
