"""The v-prediction twin of configs/gmm8_vp_teacher.py (same path, network, budget).

python -m fewstep_jax.main --config=configs/gmm8_vp_v_teacher.py --workdir=runs/gmm8_vp_v_teacher
"""

from configs import gmm8_vp_teacher


def get_config():
    return gmm8_vp_teacher.get_config(prediction="v")
