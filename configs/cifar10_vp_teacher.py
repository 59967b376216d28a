"""CIFAR-10 (32x32, unconditional) VP (discrete DDPM) teacher of the DDPM++ size.

python -m fewstep_jax.main --config=configs/cifar10_vp_teacher.py --workdir=runs/cifar10_vp_teacher
python -m fewstep_jax.dryrun --config=configs/cifar10_vp_teacher.py

The "ddpm_linear" path (DDPM's 1000 linear-beta steps, t = (k+1)/1000) with eps-prediction, so the
TCD/LCM/TDM students use the integer-timestep schedules of their scripts exactly (METHODS.md 3.2, 4.3, 5.3).
Network: the same 58.7M-parameter DDPM++-size UNet2D as configs/cifar10_rf_teacher.py, dropout
0.1 (DDPM). Recipe (DDPM / score_sde CIFAR-10): Adam lr 2e-4, 5000 warm-up steps, grad-clip 1,
batch 128, EMA 0.9999, discrete timesteps. Data and FID: as configs/cifar10_rf_teacher.py.

Mesh: one 8-accelerator host, data parallel: mesh data=8, fsdp=1.
"""

from configs import base
from configs.cifar10_rf_teacher import add_dryrun, ddpmpp_unet


def get_config():
    c = base.get_config()
    c.mode = "train_teacher"
    c.testbed.name = "tfds:cifar10"
    c.testbed.path = "ddpm_linear"
    c.model = ddpmpp_unet(32)
    c.model.dropout = 0.1
    c.teacher.prediction = "eps"
    c.losses.diffusion = {"weight": 1.0, "t_sampling": "discrete"}
    c.train.num_steps = 800_000
    c.train.batch_size = 128
    c.train.log_every = 1000
    c.train.checkpoint_every = 10_000
    c.train.eval_every = 50_000
    c.optim.name = "adam"
    c.optim.lr = 2e-4
    c.optim.schedule = "constant"
    c.optim.warmup_steps = 5000
    c.optim.grad_clip = 1.0
    c.ema.decay = 0.9999
    c.eval.grid = "edm"
    c.mesh.data = 8
    c.mesh.fsdp = 1
    add_dryrun(c, "a100_40gb", 8)
    return c
