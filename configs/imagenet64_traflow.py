"""TraFlow student of the ImageNet-64 class-conditional RF teacher (docs/methods.md §2.3).

python -m fewstep_jax.main --config=configs/imagenet64_traflow.py --workdir=runs/imagenet64_traflow
python -m fewstep_jax.modes.dryrun --config=configs/imagenet64_traflow.py

Teacher: configs/imagenet64_teacher.py (runs/imagenet64_teacher). Student: its 266M UNet + the
s-branch, initialised from it; labels from the data (conditional student, no guidance distilled).
Grid: uniform N = 40 (CTM's ImageNet grid size), jumps up to 39. Recipe: Adam lr 4e-4 (CTM),
batch 1024, target EMA 0.999, eval EMA 0.9999. Mesh: a TPU v5p slice of 32 chips, data=16,
fsdp=2 (the replicated teacher is another 0.5 GiB per chip).
"""

from fewstep_jax.recipes import apply_recipe, experiments


def get_config():
    c = experiments.imagenet64_student()  # read by index, as the teacher
    apply_recipe(c, "traflow")
    c.losses.traflow.num_grid = 40
    c.losses.traflow.max_jump = 39
    c.train.num_steps = 200_000
    c.train.batch_size = 1024
    c.optim.name = "adam"
    c.optim.lr = 4e-4
    c.optim.warmup_steps = 1000
    c.ema.decay = 0.9999
    c.ema.target_decay = 0.999
    return c
