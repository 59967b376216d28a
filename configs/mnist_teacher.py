"""Trains a class-conditional UNet (about 1.1M params) flow-matching teacher on MNIST.

XLA_FLAGS=--xla_force_host_platform_device_count=2 \\
python -m fewstep_jax.main --config=configs/mnist_teacher.py --workdir=runs/mnist_teacher \\
    --config.testbed.mnist_path=../shared/data/mnist.npz   # or leave empty for tfds 'mnist'

CPU budget (measured, README "Trained teachers"): 3000 steps at batch 32 on a 2-core x86 machine
with the batch split over 2 host devices (the XLA_FLAGS line: XLA:CPU keeps one core busy per
device, so 2 devices run a step about 1.75x faster than 1); an accelerator needs minutes. The
final evaluation compares the trained teacher with the exact ideal-denoiser teacher of the first
``testbed.subset`` training images at the same noise (``teacher_eval.json``).
"""

from fewstep_jax.models import unet_config
from fewstep_jax.recipes import base


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
    c.train.num_steps = 3000
    c.train.batch_size = 32
    c.train.log_every = 100
    c.train.checkpoint_every = 500
    c.train.eval_every = 0
    c.optim.lr = 3e-4
    c.optim.warmup_steps = 200
    c.ema.decay = 0.999
    c.eval.train_num_samples = 1000
    c.eval.train_nfes = (1, 2, 4, 8, 16)
    return c
