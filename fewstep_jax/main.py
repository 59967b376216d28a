"""Entry point: ``python -m fewstep_jax.main --config=configs/<file>.py --workdir=<dir>``.

The mode is a config field (``config.mode``); each mode is a function ``run(config, workdir)``
of the Python API, so a notebook can call the same thing. Config overrides go on the command
line (``--config.seed=1``); the config is locked, so an unknown key is an error naming it.

A user error (unknown mode, recipe, testbed or config key, a value of the wrong type, a missing
config file, workdir or package) prints one line ``error: ...`` and exits with status 2
(``fewstep_jax.errors``); ``--verbose`` or ``FEWSTEP_VERBOSE=1`` adds the traceback.
"""

from __future__ import annotations

import json
import os

from absl import app, flags, logging
from ml_collections import config_flags

from fewstep_jax.errors import UserError, define_verbose_flag, parse_flags_or_exit, run_cli, unknown

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py).", lock_config=True)
flags.DEFINE_string("workdir", None, "Folder holding everything of this run.")
flags.DEFINE_integer(
    "cpu_devices",
    0,
    "XLA:CPU devices this process splits the host CPU into (a machine setting, not an experiment "
    "one). 0: auto, the largest power of two <= min(cores, 8), unless XLA_FLAGS already sets "
    "--xla_force_host_platform_device_count. Accelerators are unaffected.",
)
define_verbose_flag()
flags.mark_flags_as_required(["config", "workdir"])


def cpu_device_count(requested: int, cores: int | None, xla_flags: str) -> int | None:
    """How many XLA:CPU devices to ask for; None: leave jax's setting alone.

    Why: XLA:CPU keeps about one core busy per device, so on a CPU-only machine a batch split
    over one device per core runs the same step faster (README, speed table: 1.76x for the MNIST
    UNet step on 2 cores). A power of two keeps the usual batch sizes divisible.
    """
    if requested < 0:
        raise UserError(f"--cpu_devices={requested}; expected 0 (auto) or a positive count")
    if requested:
        return requested
    if "xla_force_host_platform_device_count" in xla_flags:
        return None
    n = max(1, min(cores or 1, 8))
    return 1 << (n.bit_length() - 1)


def resolve_mode(mode: str):
    """The function running ``mode``; an unknown mode is a UserError listing the known ones."""
    from fewstep_jax.modes import MODES  # imported here: a bad command line fails before TensorFlow loads

    if mode not in MODES:
        raise unknown("mode", mode, MODES)
    return MODES[mode]


# modes that read a finished run's workdir: they must not replace the run's own config.json
READS_RUN = ("export", "sample")


def save_config(config, workdir: str) -> None:
    """Writes the resolved config next to the run's outputs (process 0 only): ``config.json``, or
    ``<mode>_config.json`` for the modes that read an existing run (export, sample)."""
    import jax

    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        name = f"{config.mode}_config.json" if config.mode in READS_RUN else "config.json"
        with open(os.path.join(workdir, name), "w") as f:
            json.dump(json.loads(config.to_json_best_effort()), f, indent=1)


def check_run_workdir(mode: str, workdir: str) -> None:
    """The modes of ``READS_RUN`` need a finished run's workdir: a missing one is an error before
    anything is written there (``save_config`` would create it)."""
    if mode in READS_RUN:
        from fewstep_jax.export.workdir import read_run_config

        read_run_config(workdir)


def main(argv) -> None:
    if len(argv) > 1:
        raise UserError(f"unexpected arguments {argv[1:]}: flags take the form --name=value")
    config, workdir = FLAGS.config, FLAGS.workdir
    run = resolve_mode(config.mode)
    check_run_workdir(config.mode, workdir)
    n = cpu_device_count(FLAGS.cpu_devices, os.cpu_count(), os.environ.get("XLA_FLAGS", ""))
    if n is not None:
        import jax

        jax.config.update("jax_num_cpu_devices", n)  # must precede the first backend use
    from fewstep_jax import parallel

    # before anything touches a device (save_config asks for the process index)
    parallel.initialize_distributed()
    save_config(config, workdir)
    import jax

    logging.info(
        "mode %s, workdir %s, %d %s device(s) over %d process(es)",
        config.mode,
        workdir,
        jax.device_count(),
        jax.devices()[0].platform,
        jax.process_count(),
    )
    run(config, workdir)


def run() -> None:
    """Console-script entry (``fewstep``): user errors exit with one line (fewstep_jax.errors)."""
    app.run(lambda argv: run_cli(main, argv), flags_parser=parse_flags_or_exit)


if __name__ == "__main__":
    run()
