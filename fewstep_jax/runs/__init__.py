"""Everything about a workdir on disk: checkpoints, metric writers, reading a finished run."""
