"""Trains a class-conditional MLP flow-matching teacher on the 2-D 8-Gaussian testbed.

python -m fewstep_jax.main --config=configs/gmm8_teacher.py --workdir=runs/gmm8_teacher

Budget: see the measured time in the docstring line below (2 busy CPU cores).
"""

from configs import base


def get_config():
    c = base.get_config()
    c.mode = "train_teacher"
    c.testbed.name = "gmm8"
    c.testbed.path = "rf"
    c.model.width = 128
    c.model.num_layers = 3
    c.model.emb_dim = 64
    c.model.num_classes = 8
    c.teacher.prediction = "flow"
    c.losses.flow_matching = {"weight": 1.0, "t_min": 1e-3, "t_sampling": "uniform", "label_dropout": 0.1}
    c.train.num_steps = 3000
    c.train.batch_size = 512
    c.train.log_every = 250
    c.train.checkpoint_every = 1000
    c.optim.lr = 2e-3
    c.optim.warmup_steps = 100
    c.ema.decay = 0.995
    return c
