"""The modes of the entry point, one file each; ``MODES`` maps a mode name to its
``run(config, workdir)``, a function of the Python API (a notebook calls the same thing)."""

from fewstep_jax.modes import distill, dryrun, evaluate, export, pipeline, sample, train_teacher

MODES = {
    "evaluate": evaluate.run,
    "train_teacher": train_teacher.run,
    "distill": distill.run,
    "dryrun": dryrun.run,
    "export": export.run,
    "sample": sample.run,
    "pipeline": pipeline.run,
}

__all__ = ["MODES"]
