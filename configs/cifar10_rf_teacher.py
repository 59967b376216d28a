"""CIFAR-10 (32x32, unconditional) rectified-flow teacher of the DDPM++ size (METHODS.md 5.1).

python -m fewstep_jax.main --config=configs/cifar10_rf_teacher.py --workdir=runs/cifar10_rf_teacher
python -m fewstep_jax.dryrun --config=configs/cifar10_rf_teacher.py    # memory/FLOPs, no accelerator

Data: the dataset testbed ``tfds:cifar10`` (train split, prepared on disk: give its TFDS data_dir
with ``--config.testbed.data_dir=DIR``; nothing is downloaded). FID at the evaluations with
``--config.eval.fid_inception=inception_fid.npz --config.eval.fid_reference=cifar10_train.npz``
(see fewstep_jax/evaluation/fid.py); without them the evaluations write sample grids only.

Network: the diffusers-style UNet2D closest to DDPM++ (score_sde ``ncsnpp``/``ddpmpp`` nf 128,
ch_mult (1, 2, 2, 2), 4 res blocks per resolution, attention at 16x16): block_out_channels
(128, 256, 256, 256), layers_per_block 4 (so 5 resnets per up block, as diffusers), attention
at 16x16 and in the mid block, one 256-channel head; 61.8M parameters (DDPM++ cont. is 62M;
Ho et al.'s 35.7M DDPM has 2 res blocks). Recipe of the RF paper's CIFAR-10 config: Adam lr
2e-4, 5000 warm-up steps, grad-clip 1, batch 128, dropout 0.15, EMA 0.999999 (we use 0.9999,
the reflow/distill value, as runs here are far shorter than 1.3M steps). Compute in bfloat16
(params float32).

Mesh: one 8-accelerator host (8x A100/H100 or a TPU v5e-8): data parallel, mesh data=8,
fsdp=1 (params replicated; 61.8M params + Adam + EMA are about 1 GB per device).
"""

import ml_collections

from configs import base

DATA_SHAPE = (32, 32, 3)


def ddpmpp_unet(sample_size: int = 32, num_classes: int = 0) -> ml_collections.ConfigDict:
    """The DDPM++-size UNet2D config of every scale config (teacher and students alike)."""
    return ml_collections.ConfigDict(
        {
            "name": "unet",
            "sample_size": sample_size,
            "in_channels": 3,
            "out_channels": 3,
            "block_out_channels": (128, 256, 256, 256),
            "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
            "up_block_types": ("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
            "layers_per_block": 4,
            "attention_head_dim": 256,
            "norm_num_groups": 32,
            "norm_eps": 1e-6,
            "dropout": 0.15,
            "time_scale": 1000.0,
            "num_classes": num_classes,
            "use_s": False,
            "use_guidance": False,
            "guidance_embed_dim": 256,
            "num_step_classes": 0,
            "dtype": "bfloat16",
        }
    )


def add_dryrun(c, accelerator: str, num_devices: int, teacher_config: str = "") -> None:
    """The ``config.dryrun`` block read by ``fewstep_jax.dryrun`` (added before the lock).

    accelerator: a key of ``dryrun.ACCELERATORS``; num_devices: the chips of the expected slice
    (the mesh ``config.mesh`` is laid over them); teacher_config: for a distill run, the config
    file of its teacher (the dry run builds the teacher's params shape from it).
    """
    c.dryrun = ml_collections.ConfigDict()
    c.dryrun.accelerator = accelerator
    c.dryrun.num_devices = num_devices
    c.dryrun.teacher_config = teacher_config
    c.dryrun.mfu = 0.4  # assumed model-FLOP utilisation for the implied step time
    c.dryrun.step_time = 0.0  # seconds of a measured step (> 0: report the MFU it implies)
    c.dryrun.hbm_headroom = 0.9  # fraction of HBM a run may use (the rest: runtime, fragmentation)


def get_config():
    c = base.get_config()
    c.mode = "train_teacher"
    c.testbed.name = "tfds:cifar10"
    c.testbed.path = "rf"
    c.model = ddpmpp_unet(32)
    c.teacher.prediction = "flow"
    c.losses.flow_matching = {"weight": 1.0, "t_min": 1e-3, "t_sampling": "uniform"}
    c.train.num_steps = 400_000
    c.train.batch_size = 128
    c.train.log_every = 1000
    c.train.checkpoint_every = 10_000
    c.train.eval_every = 50_000
    c.optim.name = "adam"
    c.optim.lr = 2e-4
    c.optim.schedule = "constant"
    c.optim.warmup_steps = 5000
    c.optim.grad_clip = 1.0
    c.ema.decay = 0.9999
    c.eval.grid = "uniform"
    c.mesh.data = 8
    c.mesh.fsdp = 1
    add_dryrun(c, "a100_40gb", 8)
    return c


def student_base(teacher_file: str, teacher_workdir: str, get_teacher_config):
    """A distill config on the teacher's data, path, network (+ the s-branch) and mesh.

    teacher_file: the teacher's config file (for the dry run); teacher_workdir: its train_teacher
    run, read by ``distill``; get_teacher_config: that file's ``get_config``.
    """
    t = get_teacher_config()
    c = base.get_config()
    c.mode = "distill"
    c.testbed.name = t.testbed.name
    c.testbed.path = t.testbed.path
    c.testbed.data_dir = t.testbed.data_dir
    c.testbed.split = t.testbed.split
    c.testbed.in_memory = t.testbed.in_memory
    c.model = ml_collections.ConfigDict(t.model.to_dict())
    c.model.dropout = 0.0  # CD/CTM distil with dropout 0
    c.model.use_s = True
    c.teacher.workdir = teacher_workdir
    c.teacher.prediction = t.teacher.prediction
    c.student.init_from_teacher = True
    c.student.data = "data"
    c.train.log_every = 1000
    c.train.checkpoint_every = 10_000
    c.train.eval_every = 0
    c.optim.schedule = "constant"
    c.eval.grid = t.eval.grid
    c.mesh.data = t.mesh.data
    c.mesh.fsdp = t.mesh.fsdp
    add_dryrun(c, t.dryrun.accelerator, t.dryrun.num_devices, teacher_config=teacher_file)
    return c
