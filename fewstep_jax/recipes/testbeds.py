"""Testbed-dependent settings of distillation runs: the student network, batch and budget."""

from fewstep_jax.errors import unknown
from fewstep_jax.models import unet_config


def apply_testbed(c, name: str, steps: int | None = None) -> None:
    """Sets ``c.testbed.name`` and the network/batch/budget that fit it on a 2-core CPU."""
    c.testbed.name = name
    c.mode = "distill"
    if name in ("gmm8", "checker", "gmm_hd"):
        c.model.width = 128
        c.model.num_layers = 3
        c.model.emb_dim = 64
        c.train.batch_size = 256
        c.train.num_steps = steps or 2000
        c.optim.lr = 1e-3
        c.eval.num_samples = 2000
    elif name in ("digits", "mnist"):
        c.model = unet_config(name)
        c.train.batch_size = 32
        c.train.num_steps = steps or 1000
        c.optim.lr = 2e-4
        c.eval.num_samples = 500
        c.eval.batch_size = 250
    else:
        raise unknown("distillation testbed", name, ("gmm8", "checker", "gmm_hd", "digits", "mnist"))
    c.model.use_s = True
    c.train.log_every = 100
    c.train.checkpoint_every = max(500, c.train.num_steps // 2)
    # a warm-up longer than a short run would keep it below its lr throughout (MNIST: 60 steps)
    c.optim.warmup_steps = min(100, int(c.train.num_steps) // 10)
    c.ema.decay = 0.99
