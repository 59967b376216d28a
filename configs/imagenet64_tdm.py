"""TDM of the ImageNet-64 class-conditional RF teacher, 4-step generator (docs/methods.md §4.3, 4.7).

python -m fewstep_jax.main --config=configs/imagenet64_tdm.py --workdir=runs/imagenet64_tdm
python -m fewstep_jax.modes.dryrun --config=configs/imagenet64_tdm.py

Teacher: configs/imagenet64_teacher.py. Method: the ``tdm`` recipe as in configs/cifar10_tdm.py
(generator and fake score: the teacher's 266M UNet, initialised from it; data-free batches of
noise with uniform labels); CFG scale 1.5 baked into the target (the demo uses 4.5 for text;
ImageNet-64 needs far less). Demo numbers otherwise: AdamW betas (0, 0.95), wd 1e-2, fake lr
2e-5, generator 4e-6, 50 warm-up steps then cosine, grad-clip 1, pseudo-Huber. Batch 512. Mesh: a
TPU v5p slice of 32 chips, data=8, fsdp=4 (three 266M networks, two trained).
"""

from fewstep_jax.recipes import experiments


def get_config():
    c = experiments.imagenet64_student()  # read by index, as the teacher
    c.train.num_steps = 20_000
    experiments.dm_student(c, "tdm", lr=4e-6, fake_lr=2e-5)
    c.losses.tdm.guidance = 1.5
    c.train.batch_size = 512
    c.optim.schedule = "cosine"
    c.optim.warmup_steps = 50
    c.ema.decay = 0.999
    c.mesh.data = 8
    c.mesh.fsdp = 4
    return c
