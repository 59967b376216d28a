"""Latent-consistency-style distillation (LCM, pixel space) of the CIFAR-10 VP teacher
(docs/methods.md §5.3).

python -m fewstep_jax.main --config=configs/cifar10_lcm.py --workdir=runs/cifar10_lcm
python -m fewstep_jax.modes.dryrun --config=configs/cifar10_lcm.py

Teacher: configs/cifar10_vp_teacher.py (runs/cifar10_vp_teacher). Method: the ``lcm`` recipe
(fewstep_jax/recipes/tcd.py: LCM's boundary scalings, timestep scaling 10, on the 50-point DDIM grid
skipping step 20; an s-agnostic network; target EMA 0.95; multistep sampling = TCD's SSS with
gamma 1). Student: the teacher's UNet in eps-prediction, no guidance (unconditional). The
teacher, optimizer, batch and EMAs of configs/cifar10_tcd.py (diffusers LCM full-model script:
AdamW wd 1e-2, grad-clip 1, constant lr after 500 warm-up steps, per-device batch 12; lr 1e-4
instead of SD's 1e-6). Mesh: one 8-accelerator host, data=8, fsdp=1.
"""

from fewstep_jax.recipes import experiments


def get_config():
    return experiments.cifar10_vp_student("lcm")
