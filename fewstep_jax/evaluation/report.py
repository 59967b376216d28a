"""End-of-run reports: ``report.md`` with the metrics table and PNG figures (side effects only).

Figures: sample grids side by side per NFE (scatter plots for 2-D data, image grids for images),
trajectory plots for 2-D data, and loss curves from the run's ``metrics.jsonl``.
:func:`write_run_report` is the end-of-run report the modes hand to the training loop
(``train.loop.train(report_fn=...)``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path as FilePath

import numpy as np

from fewstep_jax.evaluation.tables import markdown_table


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def image_grid(images: np.ndarray, ncols: int = 8) -> np.ndarray:
    """(N, H, W, C) in [-1, 1] -> one grid image as floats in [0, 1] (train.writers.image_grid)."""
    from fewstep_jax.runs.writers import image_grid as uint8_grid

    return uint8_grid(np.asarray(images, np.float32), ncols).astype(np.float32) / 255.0


def plot_samples(
    panels: dict[str, dict[int, np.ndarray]],
    path: str,
    reference: np.ndarray | None = None,
    max_points: int = 2000,
) -> str:
    """Method rows x NFE columns of samples: scatter (2-D data) or image grids (NHWC).

    Column keys are NFEs (ints, sorted) or labels such as ``"exact"`` (placed after them).
    """
    plt = _plt()
    keys = {n for by_nfe in panels.values() for n in by_nfe}
    nfes = sorted(k for k in keys if isinstance(k, int)) + sorted(k for k in keys if not isinstance(k, int))
    fig, axes = plt.subplots(
        len(panels), len(nfes), figsize=(2.6 * len(nfes), 2.6 * len(panels)), squeeze=False
    )
    for i, (method, by_nfe) in enumerate(panels.items()):
        for j, nfe in enumerate(nfes):
            ax = axes[i, j]
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(method)
            if i == 0:
                ax.set_title(f"NFE {nfe}" if isinstance(nfe, int) else str(nfe))
            if nfe not in by_nfe:
                ax.set_frame_on(False)  # keeps the row label of the first column
                continue
            x = np.asarray(by_nfe[nfe])
            if x.ndim == 2:
                if reference is not None:
                    ax.scatter(*reference[:max_points, :2].T, s=1, c="0.8")
                ax.scatter(*x[:max_points, :2].T, s=1, c="C0")
                ax.set_aspect("equal")
            else:
                g = image_grid(x[:64])
                ax.imshow(g[..., 0] if g.shape[-1] == 1 else g, cmap="gray", vmin=0, vmax=1)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_trajectories(trajectories: dict[str, np.ndarray], path: str, max_paths: int = 200) -> str:
    """2-D trajectories (T+1, B, 2) per method, one panel each: straight lines are what distillation wants."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(trajectories), figsize=(3.2 * len(trajectories), 3.2), squeeze=False)
    for ax, (name, traj) in zip(axes[0], trajectories.items()):
        tr = np.asarray(traj)[:, :max_paths, :2]
        ax.plot(tr[:, :, 0], tr[:, :, 1], lw=0.4, c="C0", alpha=0.5)
        ax.scatter(*tr[0].T, s=2, c="0.6")
        ax.scatter(*tr[-1].T, s=2, c="C3")
        ax.set_title(name)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_loss_curves(records: Sequence[dict], path: str, keys: Sequence[str] | None = None) -> str | None:
    """Loss curves (log scale) of the scalar series whose name contains 'loss'."""
    keys = keys or sorted({k for r in records for k in r if "loss" in k})
    if not keys:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for k in keys:
        pts = [(r["step"], r[k]) for r in records if k in r and np.isfinite(r[k])]
        if pts:
            s, v = zip(*pts)
            ax.plot(s, np.abs(v), label=k, lw=1)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def write_report(
    workdir: str,
    title: str,
    rows: Sequence[dict],
    columns: Sequence[str],
    figures: dict[str, str] | None = None,
    notes: str = "",
) -> str:
    """Writes ``workdir/report.md``: the table, then the figures (paths relative to workdir)."""
    parts = [f"# {title}", "", notes, "", markdown_table(rows, columns), ""]
    for caption, fig in (figures or {}).items():
        if fig:
            parts += [f"## {caption}", "", f"![{caption}]({os.path.relpath(fig, workdir)})", ""]
    path = os.path.join(workdir, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(parts))
    return path


def write_run_report(workdir: FilePath, evals: dict[str, float]) -> None:
    """``loss_curve.png`` (loss terms vs step, from metrics.jsonl) and ``report.md`` (the last
    logged metrics and the final evaluation ``evals``) of a training run in ``workdir``."""
    from fewstep_jax.runs import writers

    rows = [r for r in writers.read_metrics(workdir) if "loss" in r]
    keys = sorted({k for r in rows for k in r if k == "loss" or k.startswith("loss/") or k.endswith("/loss")})
    figure = plot_loss_curves(rows, str(workdir / "loss_curve.png"), keys=keys)
    last = rows[-1] if rows else {}
    table = [{"metric": k, "value": v} for k, v in sorted(last.items()) if k != "step"]
    notes = f"Final step {last['step']}." if last else "No training step logged."
    if evals:
        table += [{"metric": f"eval/{k}", "value": v} for k, v in sorted(evals.items())]
    title = f"Run report: {workdir.name}"
    write_report(str(workdir), title, table, ["metric", "value"], {"Loss curve": figure}, notes)


__all__ = [
    "image_grid",
    "plot_loss_curves",
    "plot_samples",
    "plot_trajectories",
    "write_report",
    "write_run_report",
]
