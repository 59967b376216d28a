"""Trajectory distribution matching (TDM) of the CIFAR-10 rectified-flow teacher
(METHODS.md 4.3, adapted to an RF teacher as in 4.7).

python -m fewstep_jax.main --config=configs/cifar10_tdm.py --workdir=runs/cifar10_tdm
python -m fewstep_jax.dryrun --config=configs/cifar10_tdm.py

Teacher: configs/cifar10_rf_teacher.py (runs/cifar10_rf_teacher). Two networks, both the
teacher's UNet initialised from it: the 4-step generator (student, Euler form, data-free: batches
of noise) and the fake score "fake" (aux net, updated first, 1:1). Demo recipe: AdamW betas
(0, 0.95), wd 1e-2, fake lr 2e-5, generator lr 2e-5/5 = 4e-6, 50 warm-up steps then cosine,
grad-clip 1, pseudo-Huber c = 1e-3, separate intervals; no CFG (unconditional). Batch: the demo
leaves it open; 128. Mesh: one 8-accelerator host, data=8, fsdp=1 (teacher replicated).
"""

import ml_collections

from configs import cifar10_rf_teacher


def get_config():
    c = cifar10_rf_teacher.student_base(
        "configs/cifar10_rf_teacher.py", "runs/cifar10_rf_teacher", cifar10_rf_teacher.get_config
    )
    c.method = "tdm"
    c.student.form = "euler"
    c.student.prediction = "flow"
    c.student.data = "noise"
    c.model.use_s = False
    c.losses.tdm = {"weight": 1.0, "num_steps": (4,), "distance": "pseudo_huber", "guidance": 1.0}
    fake_model = ml_collections.ConfigDict(c.model.to_dict())
    c.aux_nets.fake = {
        "model": fake_model,
        "losses": {"tdm_fake": {"weight": 1.0, "num_steps": (4,)}},
        "optim": {"lr": 2e-5},
        "update_every": 1,
        "init_from_teacher": True,
        "prediction": "flow",
    }
    c.train.num_steps = 20_000
    c.train.batch_size = 128
    c.optim.name = "adamw"
    c.optim.lr = 4e-6
    c.optim.b1 = 0.0
    c.optim.b2 = 0.95
    c.optim.weight_decay = 1e-2
    c.optim.schedule = "cosine"
    c.optim.warmup_steps = 50
    c.optim.grad_clip = 1.0
    c.ema.decay = 0.999
    c.sampler.grid = "uniform"
    c.sampler.nfes = (4,)
    return c
