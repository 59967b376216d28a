"""The scale experiments' shared pieces: networks, teachers and student bases of ``configs/``.

The experiment files of ``configs/`` (loaded by path: ``--config=configs/x.py`` or
``fewstep_jax.modes.dryrun.load_config_file``) are thin ``get_config`` functions over these; a
piece used by more than one experiment (the DDPM++ / ADM UNets, the CIFAR-10 and ImageNet-64
teachers, the distill base on a teacher, the distribution-matching and TCD/LCM students) is
written down here once. Each experiment file's docstring keeps its usage and numbers.

The teacher config files named here (``"configs/cifar10_rf_teacher.py"``, ...) are only
recorded in ``config.dryrun.teacher_config`` as paths, for the dry run to load; nothing in the
library imports ``configs/``.
"""

from __future__ import annotations

from collections.abc import Callable

import ml_collections

from fewstep_jax.models import unet_config
from fewstep_jax.recipes import apply_recipe, base

# ----------------------------------------------------------------------------------------------
# networks


def ddpmpp_unet(sample_size: int = 32, num_classes: int = 0) -> ml_collections.ConfigDict:
    """The DDPM++-size UNet2D config of every scale config (teacher and students alike).

    The diffusers-style UNet2D closest to DDPM++ (score_sde ``ncsnpp``/``ddpmpp`` nf 128, ch_mult
    (1, 2, 2, 2), 4 res blocks per resolution, attention at 16x16): block_out_channels (128, 256,
    256, 256), layers_per_block 4 (so 5 resnets per up block, as diffusers), attention at 16x16
    and in the mid block, one 256-channel head; 61.8M parameters at 32x32 (DDPM++ cont. is 62M).
    Dropout 0.15 (the RF paper's CIFAR-10 value), compute in bfloat16 (params float32).
    """
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


def adm64_unet(num_classes: int = 1000) -> ml_collections.ConfigDict:
    """The ADM/EDM-size ImageNet-64 UNet2D: block_out_channels (192, 384, 576, 768), 3 layers per
    block, attention (64-channel heads) at 32, 16 and 8 px and in the mid block, dropout 0.1 and a
    ``num_classes`` label embedding: 265.7M parameters with 1000 classes (EDM's ADM ImageNet-64
    has 296M)."""
    m = ddpmpp_unet(64, num_classes)
    m.block_out_channels = (192, 384, 576, 768)
    m.layers_per_block = 3
    m.attention_head_dim = 64
    m.down_block_types = ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D")
    m.up_block_types = ("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D")
    m.dropout = 0.1
    return m


# ----------------------------------------------------------------------------------------------
# dry run


def add_dryrun(c, accelerator: str, num_devices: int, teacher_config: str = "") -> None:
    """The ``config.dryrun`` block read by ``fewstep_jax.modes.dryrun`` (added before the lock).

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


# ----------------------------------------------------------------------------------------------
# teachers


def cifar10_rf_teacher() -> ml_collections.ConfigDict:
    """CIFAR-10 (32x32, unconditional) rectified-flow teacher of the DDPM++ size
    (configs/cifar10_rf_teacher.py).

    Data ``tfds:cifar10``; network ``ddpmpp_unet(32)``. Recipe of the RF paper's CIFAR-10 config:
    Adam lr 2e-4, 5000 warm-up steps, grad-clip 1, batch 128, dropout 0.15, EMA 0.999999 (we use
    0.9999, the reflow/distill value, as runs here are far shorter than 1.3M steps). Mesh: one
    8-accelerator host, data=8, fsdp=1; dry run on 8 A100 40GB.
    """
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


def cifar10_vp_teacher() -> ml_collections.ConfigDict:
    """CIFAR-10 VP (discrete DDPM) teacher of the DDPM++ size (configs/cifar10_vp_teacher.py).

    The "ddpm_linear" path (DDPM's 1000 linear-beta steps, t = (k+1)/1000) with eps-prediction,
    dropout 0.1 (DDPM), 800k steps, evaluated on the EDM grid.
    """
    # the RF teacher's data, network, optimizer, EMA, mesh and dry-run target; only the path,
    # prediction, objective, dropout, length and evaluation grid differ
    c = cifar10_rf_teacher()
    c.testbed.path = "ddpm_linear"
    c.model.dropout = 0.1
    c.teacher.prediction = "eps"
    del c.losses["flow_matching"]
    c.losses.diffusion = {"weight": 1.0, "t_sampling": "discrete"}
    c.train.num_steps = 800_000
    c.eval.grid = "edm"
    return c


def imagenet64_teacher() -> ml_collections.ConfigDict:
    """ImageNet-64 class-conditional rectified-flow teacher, ADM/EDM size (266M parameters;
    configs/imagenet64_teacher.py).

    Data ``tfds:imagenet_resized/64x64`` read by index (``testbed.in_memory = False``), labels
    0..999, label dropout 0.1 for classifier-free guidance; network ``adm64_unet(1000)``. Recipe
    (EDM ImageNet-64 order): Adam lr 2e-4, 5000 warm-up steps, grad-clip 1, batch 1024, EMA
    0.9999, bfloat16. Mesh: a TPU v5p slice of 32 chips, data=16, fsdp=2.
    """
    c = base.get_config()
    c.mode = "train_teacher"
    c.testbed.name = "tfds:imagenet_resized/64x64"
    c.testbed.path = "rf"
    c.testbed.in_memory = False  # read by index (ArrayRecord): 63 GB of float32 per host otherwise
    c.model = adm64_unet(1000)
    c.teacher.prediction = "flow"
    c.losses.flow_matching = {
        "weight": 1.0,
        "t_min": 1e-3,
        "t_sampling": "logit_normal",
        "label_dropout": 0.1,
    }
    c.train.num_steps = 400_000
    c.train.batch_size = 1024
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
    c.mesh.data = 16
    c.mesh.fsdp = 2
    add_dryrun(c, "tpu_v5p", 32)
    return c


def mnist_teacher() -> ml_collections.ConfigDict:
    """Class-conditional UNet (about 1.1M params) flow-matching teacher on MNIST
    (configs/mnist_teacher.py; also trained by ``fewstep_jax.bench.accelerator``, which has no
    configs/ when the package is installed).

    Logit-normal t, label dropout 0.1 for classifier-free guidance, 3000 steps at batch 32, Adam
    lr 3e-4 after 200 warm-up steps, EMA 0.999; the final evaluation compares it with the exact
    ideal-denoiser teacher of the first ``testbed.subset`` training images at the same noise.
    """
    c = base.get_config()
    c.mode = "train_teacher"
    c.testbed.name = "mnist"
    c.testbed.path = "rf"
    c.testbed.subset = 5000  # images of the analytic (ideal-denoiser) reference teacher
    c.model = unet_config("mnist")
    c.model.num_classes = 10
    c.teacher.prediction = "flow"
    c.losses.flow_matching = {
        "weight": 1.0,
        "t_min": 1e-3,
        "t_sampling": "logit_normal",
        "label_dropout": 0.1,
    }
    c.train.num_steps = 3000
    c.train.batch_size = 32
    c.train.log_every = 100
    c.train.checkpoint_every = 500
    c.train.eval_every = 0
    c.optim.lr = 3e-4
    c.optim.warmup_steps = 200
    c.ema.decay = 0.999
    c.eval.train_num_samples = 1000
    c.eval.train_nfes = (1, 2, 4, 8, 16)
    return c


def gmm8_vp_teacher(prediction: str = "eps") -> ml_collections.ConfigDict:
    """A class-conditional MLP teacher on gmm8 on the DDPM (VP) path, ``prediction`` eps or v
    (configs/gmm8_vp_teacher.py, configs/gmm8_vp_v_teacher.py).

    The diffusion loss on the discrete DDPM timesteps (scaled_linear, t = (k + 1) / 1000) with
    label dropout 0.1 for classifier-free guidance, as a TCD / LCM teacher is trained. Its
    periodic evaluation solves with Euler and DDIM on TCD's time grid.
    """
    c = base.get_config()
    c.mode = "train_teacher"
    c.testbed.name = "gmm8"
    c.testbed.path = "ddpm"
    c.model.width = 128
    c.model.num_layers = 3
    c.model.emb_dim = 64
    c.model.num_classes = 8
    c.teacher.prediction = prediction
    c.losses.diffusion = {"weight": 1.0, "t_sampling": "discrete", "label_dropout": 0.1}
    c.train.num_steps = 3000
    c.train.batch_size = 512
    c.train.log_every = 250
    c.train.checkpoint_every = 1000
    c.optim.lr = 2e-3
    c.optim.warmup_steps = 100
    c.ema.decay = 0.995
    c.eval.grid = "tcd"
    c.eval.train_solvers = ("euler", "ddim")
    return c


# ----------------------------------------------------------------------------------------------
# students


def student_base(
    teacher_file: str,
    teacher_workdir: str,
    get_teacher_config: Callable[[], ml_collections.ConfigDict],
) -> ml_collections.ConfigDict:
    """A distill config on the teacher's data, path, network (+ the s-branch) and mesh.

    teacher_file: the teacher's config file (for the dry run, e.g.
    ``"configs/cifar10_rf_teacher.py"``; recorded in ``dryrun.teacher_config``); teacher_workdir:
    its train_teacher run, read by ``distill``; get_teacher_config: the function building that
    teacher's config (e.g. ``cifar10_rf_teacher``).
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


def cifar10_rf_student() -> ml_collections.ConfigDict:
    """``student_base`` on the CIFAR-10 RF teacher (configs/cifar10_rf_teacher.py, trained into
    runs/cifar10_rf_teacher)."""
    return student_base("configs/cifar10_rf_teacher.py", "runs/cifar10_rf_teacher", cifar10_rf_teacher)


def cifar10_vp_student_base() -> ml_collections.ConfigDict:
    """``student_base`` on the CIFAR-10 VP teacher (configs/cifar10_vp_teacher.py, trained into
    runs/cifar10_vp_teacher)."""
    return student_base("configs/cifar10_vp_teacher.py", "runs/cifar10_vp_teacher", cifar10_vp_teacher)


def imagenet64_student() -> ml_collections.ConfigDict:
    """``student_base`` on the ImageNet-64 teacher (configs/imagenet64_teacher.py, trained into
    runs/imagenet64_teacher); read by index, not held in RAM, as the teacher."""
    c = student_base("configs/imagenet64_teacher.py", "runs/imagenet64_teacher", imagenet64_teacher)
    c.testbed.in_memory = False  # as the teacher: ImageNet-64 is read by index, not held in RAM
    return c


def dm_student(c, recipe: str, lr: float, fake_lr: float):
    """``recipe`` (tdm / dmd / dmd2) on a student of a network teacher: generator lr ``lr``, fake
    lr ``fake_lr``, AdamW wd 1e-2, grad-clip 1, no fake-only warm-up."""
    apply_recipe(c, recipe)
    c.optim.lr = lr
    c.aux_nets.fake.optim.lr = fake_lr
    c.train.main_start = 0  # the fake starts as the teacher: no fake-only warm-up
    c.optim.name = "adamw"
    c.optim.weight_decay = 1e-2
    c.optim.grad_clip = 1.0
    return c


def cifar10_vp_student(recipe: str) -> ml_collections.ConfigDict:
    """A student of the CIFAR-10 VP teacher with ``recipe`` (tcd / lcm) and the full-size numbers
    of the TCD/LCM scripts (configs/cifar10_tcd.py, configs/cifar10_lcm.py).

    Eps-prediction (the teacher's, so the copied params start as the teacher), initialised from
    the teacher. Full-model TCD/LCM scripts: AdamW (0.9, 0.999) wd 1e-2, grad-clip 1, constant lr
    with 500 warm-up steps, per-device batch 12 (global 96 on 8), target EMA 0.95. The scripts' lr
    4e-6 was tuned for Stable Diffusion fine-tuning; for a 58.7M CIFAR UNet we use the CM/CTM 1e-4
    order (an assumption).
    """
    c = cifar10_vp_student_base()
    apply_recipe(c, recipe)
    c.student.prediction = "eps"
    c.train.num_steps = 100_000
    c.train.batch_size = 96
    c.optim.name = "adamw"
    c.optim.lr = 1e-4
    c.optim.weight_decay = 1e-2
    c.optim.warmup_steps = 500
    c.optim.grad_clip = 1.0
    c.ema.decay = 0.9999
    c.ema.target_decay = 0.95
    return c
