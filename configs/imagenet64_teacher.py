"""ImageNet-64 class-conditional rectified-flow teacher, ADM/EDM size (266M parameters).

python -m fewstep_jax.main --config=configs/imagenet64_teacher.py --workdir=runs/imagenet64_teacher
python -m fewstep_jax.dryrun --config=configs/imagenet64_teacher.py

Data: the dataset testbed ``tfds:imagenet_resized/64x64`` (prepared on disk; its TFDS data_dir
in ``--config.testbed.data_dir``), labels 0..999, label dropout 0.1 for classifier-free guidance.
Prepare it as ArrayRecord (``download_and_prepare(file_format="array_record")``): with
``testbed.in_memory = False`` each host reads only its rows of each batch by index instead of
holding the split as float32 (1.28M images: about 63 GB; fewstep_jax/data/random_access.py). A
TFRecord copy is still loaded whole. FID: ``--config.eval.fid_inception`` and ``fid_reference``.
Network: UNet2D block_out_channels (192, 384, 576, 768), 3 layers per
block, attention (64-channel heads) at 32, 16 and 8 px and in the mid block, 1000-class label
embedding: 265.7M parameters (EDM's ADM ImageNet-64 has 296M). Recipe (EDM ImageNet-64 order):
Adam lr 2e-4, 5000 warm-up steps, grad-clip 1, batch 1024 (EDM: 4096), EMA 0.9999, bfloat16.

Mesh: a TPU v5p slice of 32 chips (95 GiB HBM each; the dry run measured 34 GiB per chip at
batch 1024, which a 16 GiB v5e does not hold): mesh data=16, fsdp=2 (params, EMA and Adam state
split in two; 32 images per chip).
"""

from configs import base
from configs.cifar10_rf_teacher import add_dryrun, ddpmpp_unet


def adm64_unet(num_classes: int = 1000):
    m = ddpmpp_unet(64, num_classes)
    m.block_out_channels = (192, 384, 576, 768)
    m.layers_per_block = 3
    m.attention_head_dim = 64
    m.down_block_types = ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D")
    m.up_block_types = ("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D")
    m.dropout = 0.1
    return m


def get_config():
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
