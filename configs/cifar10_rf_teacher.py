"""CIFAR-10 (32x32, unconditional) rectified-flow teacher of the DDPM++ size (docs/methods.md §5.1).

python -m fewstep_jax.main --config=configs/cifar10_rf_teacher.py --workdir=runs/cifar10_rf_teacher
python -m fewstep_jax.modes.dryrun --config=configs/cifar10_rf_teacher.py    # memory/FLOPs, no accelerator

Data: the dataset testbed ``tfds:cifar10`` (train split, prepared on disk: give its TFDS data_dir
with ``--config.testbed.data_dir=DIR``; nothing is downloaded). FID at the evaluations with
``--config.eval.fid_inception=inception_fid.npz --config.eval.fid_reference=cifar10_train.npz``
(see fewstep_jax/metrics/fid.py); without them the evaluations write sample grids only.

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

from fewstep_jax.recipes import experiments


def get_config():
    return experiments.cifar10_rf_teacher()
