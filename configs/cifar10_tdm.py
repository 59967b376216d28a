"""Trajectory distribution matching (TDM) of the CIFAR-10 rectified-flow teacher
(docs/methods.md §4.3, adapted to an RF teacher as in 4.7).

python -m fewstep_jax.main --config=configs/cifar10_tdm.py --workdir=runs/cifar10_tdm
python -m fewstep_jax.modes.dryrun --config=configs/cifar10_tdm.py

Teacher: configs/cifar10_rf_teacher.py (runs/cifar10_rf_teacher). Method: the ``tdm`` recipe
(fewstep_jax/recipes/distribution_matching.py, K = 4): two networks, both the teacher's UNet
initialised from it: the 4-step generator (student, data-free: batches of noise; semi-linear form,
identical to Euler on the RF path) and the fake score "fake" (aux net, updated first, 1:1);
pseudo-Huber c = 1e-3, separate intervals, fake lr 5x the generator's, betas (0, 0.95). Scale
choices on top: no fake warm-up (the fake starts from the teacher), AdamW wd 1e-2, fake lr 2e-5
(generator 4e-6), 50 warm-up steps then cosine, grad-clip 1, no CFG (unconditional). Batch: the
demo leaves it open; 128. Mesh: one 8-accelerator host, data=8, fsdp=1 (teacher replicated).
"""

from fewstep_jax.recipes import experiments


def get_config():
    c = experiments.cifar10_rf_student()
    c.train.num_steps = 20_000
    experiments.dm_student(c, "tdm", lr=4e-6, fake_lr=2e-5)
    c.losses.tdm.guidance = 1.0
    c.train.batch_size = 128
    c.optim.schedule = "cosine"
    c.optim.warmup_steps = 50
    c.ema.decay = 0.999
    return c
