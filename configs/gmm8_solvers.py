"""The teacher's ODE solvers on the 2-D 8-Gaussian testbed (rectified-flow path).

python -m fewstep_jax.main --config=configs/gmm8_solvers.py --workdir=runs/gmm8_solvers
"""

from fewstep_jax.recipes import base


def get_config():
    return base.get_config()
