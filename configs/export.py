"""Export a trained run to a PyTorch folder (mode ``export``, fewstep_jax.export.workdir):

python -m fewstep_jax.main --config=configs/export.py --workdir=<run workdir> --config.export.out=<folder>

Only the ``export`` block matters: the run's own config is read from ``<workdir>/config.json``.
"""

import ml_collections

from fewstep_jax.recipes import base


def get_config():
    c = base.get_config()
    c.mode = "export"
    c.export = ml_collections.ConfigDict()
    c.export.out = ""  # the folder to write (required)
    c.export.ema = "eval"  # eval | target | raw (the trained params themselves)
    c.export.dtype = "float32"  # float32 | bfloat16
    c.export.overwrite = False  # replace an existing folder
    c.export.nfe = 0  # recommended sampler's NFE; 0: the largest of the run's sampler.nfes
    c.export.gamma = -1.0  # recommended gamma; < 0: the first of the run's sampler.gammas
    c.export.check = False  # then compare the folder in PyTorch with JAX (pip install "fewstep-jax[torch]")
    return c
