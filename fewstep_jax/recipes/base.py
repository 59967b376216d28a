"""Shared defaults of every run. Other config files start from ``get_config()`` here and change
existing fields only: the returned config is locked, so a misspelt key is an error naming it.

Command line overrides: ``--config.testbed.name=checker --config.eval.num_samples=4000``.
"""

import ml_collections

from fewstep_jax.models import mlp_config


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # What the run does: "evaluate" (the teacher's solvers on the testbed), "train_teacher",
    # "distill". Later issues add "sample", "export" and "pipeline" under the same key.
    c.mode = "evaluate"
    c.seed = 0

    c.testbed = ml_collections.ConfigDict()
    # exact testbeds (analytic teacher): gmm8 | checker | gmm_hd | digits | mnist; or a real dataset
    # "tfds:<name>" (e.g. tfds:cifar10, tfds:imagenet_resized/64x64; no analytic teacher, FID)
    c.testbed.name = "gmm8"
    c.testbed.path = "rf"  # rf | vp_cosine | vp_linear | ddpm (scaled_linear) | ddpm_linear | ve
    c.testbed.num_reference = 10_000  # exact data samples the distances compare against
    c.testbed.mnist_path = ""  # .npz with x_train/y_train; empty: tensorflow-datasets 'mnist'
    c.testbed.subset = 5000  # MNIST images in the ideal-denoiser teacher
    c.testbed.data_dir = ""  # tfds:<name> testbeds: the TFDS data_dir holding it; "" = TFDS's default
    c.testbed.split = "train"  # tfds:<name> testbeds: the split runs train on
    # tfds:<name> testbeds: True = the split in host RAM as float32 unless it is stored as ArrayRecord
    # and over 4 GiB (then read by index); False = read by index (ArrayRecord only: TFRecord has no
    # random access and is always loaded whole). Same batches either way (fewstep_jax/testbeds/dataset.py)
    c.testbed.in_memory = True

    c.eval = ml_collections.ConfigDict()
    c.eval.num_samples = 2000
    c.eval.nfes = (1, 2, 4, 8, 16, 32, 64)
    c.eval.solvers = ("euler", "heun", "rk4", "dpmpp_2m")
    c.eval.grid = "auto"  # auto (edm for the ve path, uniform otherwise) | uniform | edm | ddpm_leading | tcd
    c.eval.batch_size = 1000
    c.eval.train_nfes = (1, 2, 4, 8)  # NFEs of the periodic/final eval of a training run
    c.eval.train_solvers = ("euler", "heun")
    c.eval.train_num_samples = 1000
    c.eval.teacher_solvers = ("euler", "heun", "dpmpp_2m")  # teacher rows beside a distilled student
    # FID of tfds:<name> testbeds (off unless both are set): converted Inception weights (.npz, see
    # fewstep_jax/metrics/inception.py) and reference statistics (.npz mu, sigma; metrics/fid.py)
    c.eval.fid_inception = ""
    c.eval.fid_reference = ""
    c.eval.fid_batch_size = 256  # Inception batch (rounded up to a multiple of the local devices)
    c.eval.fid_resize_to = 299  # Inception input size: 299 is FID; smaller (>= 75) only for tests

    # ---- training engine (train_teacher, distill) --------------------------------------------
    c.model = mlp_config()  # the trained network (fewstep_jax.models.build_model)
    c.teacher = ml_collections.ConfigDict()
    c.teacher.prediction = "flow"  # train_teacher: the network's output (flow | eps | v | x0)
    c.teacher.workdir = ""  # distill: a train_teacher workdir; empty = the testbed's analytic teacher
    c.student = ml_collections.ConfigDict()
    c.student.form = "euler"  # euler | semilinear
    c.student.prediction = "flow"
    c.student.init_from_teacher = True  # distill: copy the teacher network's params when it has one
    c.student.data = "data"  # distill batches: "data" (testbed samples) | "noise" (data-free) | "pairs"
    # loss terms of the main network: {term: {"weight": w, ...term kwargs}} (losses/api.py);
    # config files fill it, e.g. c.losses.flow_matching = {"weight": 1.0}
    c.losses = ml_collections.ConfigDict()
    # extra networks with their own optimizer: {name: {"model": ..., "losses": {...},
    # "optim": {overrides of c.optim}, "update_every": 1, "ema_decay": -1 (off)}}
    c.aux_nets = ml_collections.ConfigDict()

    c.train = ml_collections.ConfigDict()
    c.train.num_steps = 1000
    c.train.batch_size = 256  # global batch, divisible by the device count
    c.train.log_every = 100
    c.train.checkpoint_every = 500
    c.train.keep_checkpoints = 2
    c.train.async_checkpoints = True
    c.train.eval_every = 0  # 0: only at the end
    c.train.skip_nonfinite = False  # True: skip updates with a non-finite loss/grad (counted)
    c.train.main_every = 1  # update the main network every k steps (DMD2's TTUR; aux every step)
    c.train.main_start = 0  # the main network stays frozen before this step (aux-only warm-up)

    c.optim = ml_collections.ConfigDict()
    c.optim.name = "adam"  # adam | adamw | radam
    c.optim.lr = 1e-3
    c.optim.schedule = "cosine"  # cosine | constant (after the linear warm-up)
    c.optim.warmup_steps = 100
    c.optim.min_lr_ratio = 0.0
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.weight_decay = 0.0  # adamw only
    c.optim.grad_clip = 1.0  # global norm; 0 = off

    c.ema = ml_collections.ConfigDict()
    c.ema.decay = 0.999  # the "eval" EMA
    # EDM's ramp-up of the eval EMA: half-life <= rampup_ratio x updates so far (0 = fixed decay)
    c.ema.rampup_ratio = 0.05
    c.ema.target_decay = -1.0  # the "target" EMA (consistency methods); < 0 = none

    # how a trained student samples (evaluation, reports, export): a chain of flow-map jumps on
    # a grid, optionally re-noised between jumps (gamma > 0: TCD's SSS with kind "tcd", CTM's
    # gamma-sampling with kind "ctm")
    c.sampler = ml_collections.ConfigDict()
    c.sampler.grid = "uniform"  # uniform | edm | ddpm_leading
    c.sampler.gammas = (0.0,)
    c.sampler.kind = "tcd"
    c.sampler.nfes = (1, 2, 4)

    c.method = ""  # the distillation recipe's name (fewstep_jax/recipes), for reports and export

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # -1: all devices not used by fsdp
    c.mesh.fsdp = 1
    c.mesh.min_shard_size = 2**14  # leaves smaller than this stay replicated
    return c
