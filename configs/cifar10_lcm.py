"""Latent-consistency-style distillation (LCM, pixel space) of the CIFAR-10 VP teacher
(METHODS.md 5.3).

python -m fewstep_jax.main --config=configs/cifar10_lcm.py --workdir=runs/cifar10_lcm
python -m fewstep_jax.dryrun --config=configs/cifar10_lcm.py

Teacher: configs/cifar10_vp_teacher.py (runs/cifar10_vp_teacher). Student: the teacher's UNet
(no s-branch) in eps-prediction with LCM's boundary scalings (timestep scaling 10) on the
50-point DDIM grid (skipping step 20); no guidance (unconditional). Recipe (diffusers LCM
full-model script): target EMA 0.95, AdamW wd 1e-2, grad-clip 1, constant lr after 500 warm-up
steps, per-device batch 12; lr 1e-4 instead of SD's 1e-6 (as configs/cifar10_tcd.py).
Sampler: LCM multistep = TCD's SSS with gamma 1. Mesh: one 8-accelerator host, data=8, fsdp=1.
"""

from configs import cifar10_tcd


def get_config():
    # the TCD run's teacher, grid, optimizer and EMAs; LCM differs in its loss, an s-agnostic
    # network and gamma-1 sampling
    c = cifar10_tcd.get_config()
    c.method = "lcm"
    c.model.use_s = False
    c.losses.lcm = dict(c.losses.tcd)
    del c.losses["tcd"]
    c.sampler.gammas = (1.0,)
    return c
