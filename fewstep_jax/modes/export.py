"""Mode ``export``: a trained run's workdir to a PyTorch folder (configs/export.py)."""

from __future__ import annotations

import os

import ml_collections

from fewstep_jax.errors import UserError
from fewstep_jax.export.workdir import export_from_workdir


def run(config: ml_collections.ConfigDict, workdir: str) -> str:
    """Mode ``export``: ``export_from_workdir(workdir, config.export.out, ...)`` (configs/export.py);
    ``export.check``: then compare the folder in PyTorch with JAX (needs the torch extra)."""
    ec = config.export
    if not ec.out:
        raise UserError("export needs an output folder: --config.export.out=<folder>")
    ema = None if ec.ema in ("", "raw", "none") else ec.ema
    check = bool(ec.get("check", False))
    path = export_from_workdir(
        workdir,
        ec.out,
        ema=ema,
        dtype=ec.dtype,
        overwrite=bool(ec.overwrite),
        nfe=int(ec.nfe),
        gamma=float(ec.gamma),
        check=check,
    )
    checked = " (PyTorch self-check passed)" if check else ""
    print(f"exported {workdir} to {os.path.dirname(path)}{checked}", flush=True)
    return path


__all__ = ["run"]
