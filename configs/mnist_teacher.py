"""Trains a class-conditional UNet (about 1.1M params) flow-matching teacher on MNIST.

python -m fewstep_jax.main --config=configs/mnist_teacher.py --workdir=runs/mnist_teacher \\
    --config.testbed.mnist_path=/path/to/mnist.npz        # or leave empty for tfds 'mnist'

CPU budget: not measured in this issue; a 28x28 UNet step at batch 128 is of the order of a
second on 2 CPU cores, so the default 20k steps is a many-hour CPU job (an accelerator run is
minutes). For a quick CPU teacher use --config.train.num_steps=2000 --config.train.batch_size=64.
"""

from configs import base
from fewstep_jax.models import unet_config


def get_config():
    c = base.get_config()
    c.mode = "train_teacher"
    c.testbed.name = "mnist"
    c.testbed.path = "rf"
    c.testbed.subset = 5000  # images of the analytic (ideal-denoiser) reference teacher
    c.model = unet_config("mnist")
    c.model.num_classes = 10
    c.teacher.prediction = "flow"
    c.losses.flow_matching = {
        "weight": 1.0,
        "t_min": 1e-3,
        "t_sampling": "logit_normal",
        "label_dropout": 0.1,
    }
    c.train.num_steps = 20_000
    c.train.batch_size = 128
    c.train.log_every = 200
    c.train.checkpoint_every = 2000
    c.train.eval_every = 5000
    c.optim.lr = 2e-4
    c.optim.warmup_steps = 1000
    c.ema.decay = 0.9995
    c.eval.train_num_samples = 1000
    return c
