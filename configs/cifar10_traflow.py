"""TraFlow student of the CIFAR-10 rectified-flow teacher (docs/methods.md §2.3, CTM recipe numbers).

python -m fewstep_jax.main --config=configs/cifar10_traflow.py --workdir=runs/cifar10_traflow
python -m fewstep_jax.modes.dryrun --config=configs/cifar10_traflow.py

Teacher: configs/cifar10_rf_teacher.py, trained into runs/cifar10_rf_teacher. Student: the
teacher's 58.7M UNet plus the zero-initialised s-branch, initialised from the teacher, Euler
form G = x + (s - t) g. Method: the ``traflow`` recipe (fewstep_jax/recipes/trajectory.py: uniform
grid of 8 intervals, jumps up to 8, 4 Heun substeps per teacher target; CTM's CIFAR-10 N = 18,
K = 17 is ``--config.losses.traflow.num_grid=18 --config.losses.traflow.max_jump=17``).
Numbers (CTM CIFAR-10): Adam lr 4e-4, batch 128, target EMA 0.999, eval EMA 0.9999, grad-clip 1.
Mesh: one 8-accelerator host, data=8, fsdp=1.
"""

from fewstep_jax.recipes import apply_recipe, experiments


def get_config():
    c = experiments.cifar10_rf_student()
    apply_recipe(c, "traflow")
    c.train.num_steps = 200_000
    c.train.batch_size = 128
    c.optim.name = "adam"
    c.optim.lr = 4e-4
    c.optim.warmup_steps = 1000
    c.ema.decay = 0.9999
    c.ema.target_decay = 0.999
    c.sampler.grid = "uniform"
    return c
