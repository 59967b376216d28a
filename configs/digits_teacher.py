"""Trains a class-conditional small UNet flow-matching teacher on scikit-learn's 8x8 digits.

python -m fewstep_jax.main --config=configs/digits_teacher.py --workdir=runs/digits_teacher

Not timed to convergence in this issue: on 2 CPU cores expect a few steps/s at batch 128
(about 0.7M params), i.e. roughly 30-60 min for the default 10k steps; use fewer steps
(--config.train.num_steps=2000) for a rough teacher.
"""

from fewstep_jax.models import unet_config
from fewstep_jax.recipes import base


def get_config():
    c = base.get_config()
    c.mode = "train_teacher"
    c.testbed.name = "digits"
    c.testbed.path = "rf"
    c.model = unet_config("digits")
    c.model.num_classes = 10
    c.teacher.prediction = "flow"
    c.losses.flow_matching = {
        "weight": 1.0,
        "t_min": 1e-3,
        "t_sampling": "logit_normal",
        "label_dropout": 0.1,
    }
    c.train.num_steps = 10_000
    c.train.batch_size = 128
    c.train.log_every = 200
    c.train.checkpoint_every = 1000
    c.train.eval_every = 2500
    c.optim.lr = 3e-4
    c.optim.warmup_steps = 500
    c.ema.decay = 0.999
    c.eval.train_num_samples = 1000
    return c
