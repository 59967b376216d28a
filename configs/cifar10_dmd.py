"""DMD2-style distribution matching (no GAN) of the CIFAR-10 rectified-flow teacher
(docs/methods.md §5.5).

python -m fewstep_jax.main --config=configs/cifar10_dmd.py --workdir=runs/cifar10_dmd
python -m fewstep_jax.modes.dryrun --config=configs/cifar10_dmd.py

Teacher: configs/cifar10_rf_teacher.py (runs/cifar10_rf_teacher); on the RF path the one-step
generator's x0 = z - v is well conditioned at t = 1 (a DDPM eps generator is not). Method: the
``dmd2`` recipe (fewstep_jax/recipes/distribution_matching.py: one-step generator = the student,
data-free; fake score "fake"; TTUR: fake every step, generator every 5th; no regression term).
Both networks are the teacher's UNet initialised from it. DMD2 numbers on top: AdamW (0.9, 0.999)
wd 1e-2, lr 2e-6 for both, grad-clip 10, constant lr after 500 warm-up steps, 'karras' fake
weighting (the dmd_fake default), no fake-only warm-up. Batch: 128 (DMD2's CIFAR batch is not
given). Mesh: one 8-accelerator host, data=8, fsdp=1.
"""

from fewstep_jax.recipes import experiments


def get_config():
    c = experiments.cifar10_rf_student()
    c.train.num_steps = 200_000
    experiments.dm_student(c, "dmd2", lr=2e-6, fake_lr=2e-6)
    # DMD2: the same Adam betas for the generator and the fake
    c.optim.b1, c.optim.b2 = 0.9, 0.999
    c.aux_nets.fake.optim.b1, c.aux_nets.fake.optim.b2 = 0.9, 0.999
    c.train.batch_size = 128
    c.optim.warmup_steps = 500
    c.optim.grad_clip = 10.0
    c.ema.decay = 0.999
    return c
