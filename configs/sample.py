"""Sample a trained student (or teacher) from its workdir (mode ``sample``, fewstep_jax.modes.sample):

python -m fewstep_jax.main --config=configs/sample.py --workdir=<run workdir> --config.sample.nfe=2

Writes ``samples.npz`` + ``samples.png`` to ``sample.out`` (default
``<workdir>/samples/<name>_nfe<n>_gamma<g>_seed<s>``). Only the ``sample`` block matters: the
run's own config is read from ``<workdir>/config.json``.
"""

import ml_collections

from fewstep_jax.recipes import base


def get_config():
    c = base.get_config()
    c.mode = "sample"
    c.sample = ml_collections.ConfigDict()
    c.sample.num = 64  # samples to draw
    c.sample.nfe = 0  # network evaluations; 0: the run's largest sampler.nfes (teacher: eval.train_nfes)
    c.sample.gamma = -1.0  # student re-noising in [0, 1]; < 0: the first of the run's sampler.gammas
    c.sample.grid = ""  # uniform|edm|ddpm_leading|tcd; empty: the run's sampler.grid (teacher: eval.grid)
    c.sample.solver = "euler"  # teacher runs: euler | heun | rk4 | ddim | dpmpp_2m (nfe must divide)
    c.sample.seed = 0
    c.sample.label = -1  # conditional models: a class id, -1 the null label, -2 cycles over the classes
    c.sample.guidance = 1.0
    c.sample.ema = "eval"  # eval | target | raw
    c.sample.batch_size = 1000
    c.sample.out = ""  # output folder; empty: under <workdir>/samples
    return c
