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

from configs import cifar10_rf_teacher


def get_config():
    # the RF teacher's data, network, optimizer, EMA, mesh and dry-run target; only the path,
    # prediction, objective, dropout, length and evaluation grid differ
    c = cifar10_rf_teacher.get_config()
    c.testbed.path = "ddpm_linear"
    c.model.dropout = 0.1
    c.teacher.prediction = "eps"
    del c.losses["flow_matching"]
    c.losses.diffusion = {"weight": 1.0, "t_sampling": "discrete"}
    c.train.num_steps = 800_000
    c.eval.grid = "edm"
    return c
