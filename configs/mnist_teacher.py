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

from fewstep_jax.recipes import experiments


def get_config():
    return experiments.mnist_teacher()
