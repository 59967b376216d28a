"""Trajectory consistency distillation (TCD) of the CIFAR-10 VP teacher (docs/methods.md §3.2).

python -m fewstep_jax.main --config=configs/cifar10_tcd.py --workdir=runs/cifar10_tcd
python -m fewstep_jax.modes.dryrun --config=configs/cifar10_tcd.py

Teacher: configs/cifar10_vp_teacher.py (runs/cifar10_vp_teacher; ddpm path, eps). Method: the
``tcd`` recipe (fewstep_jax/recipes/tcd.py: TCF(1), the 50-point DDIM solver grid t_i = 20 i - 1
skipping step 20, target EMA 0.95, sampled on the ``tcd`` grid it was trained on). Scale
choices on top: eps-prediction (the teacher's, so the copied params start as the teacher) with
the s-branch (t_m), initialised from the teacher; unconditional CIFAR-10: no guidance (w = 0);
SSS gamma 0.2. Recipe (full-model TCD/LCM scripts): AdamW (0.9, 0.999) wd 1e-2, grad-clip 1,
constant lr with 500 warm-up steps, per-device batch 12 (global 96 on 8). The scripts' lr 4e-6
was tuned for Stable Diffusion fine-tuning; for a 58.7M CIFAR UNet we use the CM/CTM 1e-4 order
(an assumption). Mesh: one 8-accelerator host, data=8, fsdp=1.
"""

from fewstep_jax.recipes import experiments


def get_config():
    c = experiments.cifar10_vp_student("tcd")
    c.model.use_s = True
    c.sampler.gammas = (0.2,)
    return c
