"""Shared defaults of every run. Other config files start from ``get_config()`` here and change
existing fields only: the returned config is locked, so a misspelt key is an error naming it.

Command line overrides: ``--config.testbed.name=checker --config.eval.num_samples=4000``.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # What the run does: "evaluate" (the teacher's solvers on the testbed). Later issues add
    # "train_teacher", "distill", "sample", "export" and "pipeline" under the same key.
    c.mode = "evaluate"
    c.seed = 0

    c.testbed = ml_collections.ConfigDict()
    c.testbed.name = "gmm8"  # gmm8 | checker | gmm_hd | digits | mnist
    c.testbed.path = "rf"  # rf | vp_cosine | vp_linear | ddpm | ve
    c.testbed.num_reference = 10_000  # exact data samples the distances compare against
    c.testbed.mnist_path = ""  # .npz with x_train/y_train; empty: tensorflow-datasets 'mnist'
    c.testbed.subset = 5000  # MNIST images in the ideal-denoiser teacher

    c.eval = ml_collections.ConfigDict()
    c.eval.num_samples = 2000
    c.eval.nfes = (1, 2, 4, 8, 16, 32, 64)
    c.eval.solvers = ("euler", "heun", "rk4", "dpmpp_2m")
    c.eval.grid = "auto"  # auto (uniform for rf, edm otherwise) | uniform | edm | ddpm_leading
    c.eval.batch_size = 1000
    return c
