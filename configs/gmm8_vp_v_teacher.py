"""The v-prediction twin of configs/gmm8_vp_teacher.py (same path, network, budget).

python -m fewstep_jax.main --config=configs/gmm8_vp_v_teacher.py --workdir=runs/gmm8_vp_v_teacher
"""

from fewstep_jax.recipes import experiments


def get_config():
    return experiments.gmm8_vp_teacher(prediction="v")
