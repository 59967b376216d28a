"""Trains a class-conditional eps-prediction MLP teacher on gmm8 on the DDPM (VP) path.

python -m fewstep_jax.main --config=configs/gmm8_vp_teacher.py --workdir=runs/gmm8_vp_teacher

The diffusion loss on the discrete DDPM timesteps (scaled_linear, t = (k + 1) / 1000) with label
dropout 0.1 for classifier-free guidance, as a TCD / LCM teacher is trained; ``--config.testbed.path``
picks another VP path. Distil it with ``configs/distill.py:gmm8,tcd --config.teacher.workdir=...``.
Its periodic evaluation solves with Euler and DDIM on TCD's time grid.
"""

from configs import base


def get_config(prediction: str = "eps"):
    c = base.get_config()
    c.mode = "train_teacher"
    c.testbed.name = "gmm8"
    c.testbed.path = "ddpm"
    c.model.width = 128
    c.model.num_layers = 3
    c.model.emb_dim = 64
    c.model.num_classes = 8
    c.teacher.prediction = prediction
    c.losses.diffusion = {"weight": 1.0, "t_sampling": "discrete", "label_dropout": 0.1}
    c.train.num_steps = 3000
    c.train.batch_size = 512
    c.train.log_every = 250
    c.train.checkpoint_every = 1000
    c.optim.lr = 2e-3
    c.optim.warmup_steps = 100
    c.ema.decay = 0.995
    c.eval.grid = "tcd"
    c.eval.train_solvers = ("euler", "ddim")
    return c
