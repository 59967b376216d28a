"""Trains a class-conditional eps-prediction MLP teacher on gmm8 on the DDPM (VP) path.

python -m fewstep_jax.main --config=configs/gmm8_vp_teacher.py --workdir=runs/gmm8_vp_teacher

The diffusion loss on the discrete DDPM timesteps (scaled_linear, t = (k + 1) / 1000) with label
dropout 0.1 for classifier-free guidance, as a TCD / LCM teacher is trained; ``--config.testbed.path``
picks another VP path. Distil it with ``configs/distill.py:gmm8,tcd --config.teacher.workdir=...``.
Its periodic evaluation solves with Euler and DDIM on TCD's time grid.
"""

from fewstep_jax.recipes import experiments


def get_config(prediction: str = "eps"):
    return experiments.gmm8_vp_teacher(prediction)
