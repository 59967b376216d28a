"""DMD2-style distribution matching (no GAN) of the CIFAR-10 rectified-flow teacher
(METHODS.md 5.5).

python -m fewstep_jax.main --config=configs/cifar10_dmd.py --workdir=runs/cifar10_dmd
python -m fewstep_jax.dryrun --config=configs/cifar10_dmd.py

Teacher: configs/cifar10_rf_teacher.py (runs/cifar10_rf_teacher); on the RF path the one-step
generator's x0 = z - v is well conditioned at t = 1 (a DDPM eps generator is not). Generator
(student, one step from noise, data-free) and fake score "fake" are the teacher's UNet
initialised from it. DMD2 recipe: TTUR (fake every step, generator every 5th: train.main_every
5), AdamW (0.9, 0.999) wd 1e-2, lr 2e-6 for both, grad-clip 10, constant lr after 500 warm-up
steps, 'karras' fake weighting, no regression term. Batch: 128 (DMD2's CIFAR batch is not
given). Mesh: one 8-accelerator host, data=8, fsdp=1.
"""

import ml_collections

from configs import cifar10_rf_teacher


def get_config():
    c = cifar10_rf_teacher.student_base(
        "configs/cifar10_rf_teacher.py", "runs/cifar10_rf_teacher", cifar10_rf_teacher.get_config
    )
    c.method = "dmd"
    c.student.form = "euler"
    c.student.prediction = "flow"
    c.student.data = "noise"
    c.model.use_s = False
    c.losses.dmd = {"weight": 1.0}
    c.aux_nets.fake = {
        "model": ml_collections.ConfigDict(c.model.to_dict()),
        "losses": {"dmd_fake": {"weight": 1.0}},
        "update_every": 1,
        "init_from_teacher": True,
        "prediction": "flow",
    }
    c.train.main_every = 5
    c.train.num_steps = 200_000
    c.train.batch_size = 128
    c.optim.name = "adamw"
    c.optim.lr = 2e-6
    c.optim.weight_decay = 1e-2
    c.optim.warmup_steps = 500
    c.optim.grad_clip = 10.0
    c.ema.decay = 0.999
    c.sampler.nfes = (1,)
    return c
