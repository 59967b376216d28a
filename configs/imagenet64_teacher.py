"""ImageNet-64 class-conditional rectified-flow teacher, ADM/EDM size (266M parameters).

python -m fewstep_jax.main --config=configs/imagenet64_teacher.py --workdir=runs/imagenet64_teacher
python -m fewstep_jax.modes.dryrun --config=configs/imagenet64_teacher.py

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

from fewstep_jax.recipes import experiments


def get_config():
    return experiments.imagenet64_teacher()
