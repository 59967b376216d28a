"""CIFAR-10 (32x32, unconditional) VP (discrete DDPM) teacher of the DDPM++ size.

python -m fewstep_jax.main --config=configs/cifar10_vp_teacher.py --workdir=runs/cifar10_vp_teacher
python -m fewstep_jax.modes.dryrun --config=configs/cifar10_vp_teacher.py

The "ddpm_linear" path (DDPM's 1000 linear-beta steps, t = (k+1)/1000) with eps-prediction, so the
TCD/LCM/TDM students use the integer-timestep schedules of their scripts exactly
(docs/methods.md §3.2, 4.3, 5.3).
Network: the same 58.7M-parameter DDPM++-size UNet2D as configs/cifar10_rf_teacher.py, dropout
0.1 (DDPM). Recipe (DDPM / score_sde CIFAR-10): Adam lr 2e-4, 5000 warm-up steps, grad-clip 1,
batch 128, EMA 0.9999, discrete timesteps. Data and FID: as configs/cifar10_rf_teacher.py.

Mesh: one 8-accelerator host, data parallel: mesh data=8, fsdp=1.
"""

from fewstep_jax.recipes import experiments


def get_config():
    return experiments.cifar10_vp_teacher()
