"""Metric writers (TensorBoard + console + metrics.jsonl), progress lines and image grids.

Process 0 writes TensorBoard event files and `<logdir>/metrics.jsonl` (one JSON object per
`write_scalars` call: {"step": ..., name: value}, so reports need no TensorBoard); other
processes only log to their own console and write nothing to disk.

The writers are clu's (`metric_writers`: logging, async fan-out; `periodic_actions`). clu's
TensorBoard `SummaryWriter` is TensorFlow's `tf.summary`, and importing `clu.metric_writers`
imports it; TensorFlow is optional (a GPU machine rarely has it), so where it is missing
`TensorBoardWriter` (tensorboard's own TF-free event-file writer, same summary layout) takes the
place of that one clu module before clu is imported, and everything else stays clu's.
"""

from __future__ import annotations

import io
import json
import logging
import math
import sys
import time
import types
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
from PIL import Image
from tensorboard.compat.proto import event_pb2, summary_pb2, types_pb2
from tensorboard.plugins.image import metadata as image_metadata
from tensorboard.plugins.scalar import metadata as scalar_metadata
from tensorboard.summary.writer.event_file_writer import EventFileWriter
from tensorboard.util import tensor_util

# The plugin metadata `tf.summary.scalar` / `tf.summary.image` attach to every value.
_SCALARS = scalar_metadata.create_summary_metadata(display_name=None, description=None)
_IMAGES = image_metadata.create_summary_metadata(display_name=None, description=None)


class TensorBoardWriter:
    """TensorBoard event files without TensorFlow, laid out as `tf.summary` (clu's SummaryWriter)
    writes them: a scalar is a float32 tensor of the "scalars" plugin, an image batch (K, H, W, C)
    uint8 a string tensor [width, height, png_1 .. png_K] of the "images" plugin. Other kinds
    (videos, audio, text, histograms, hparams, raw summaries) are logged as unsupported, once."""

    def __init__(self, logdir: str):
        self._writer = EventFileWriter(str(logdir))
        self._warned: set[str] = set()

    def _write(self, step: int, tensors: Mapping[str, Any], metadata: summary_pb2.SummaryMetadata) -> None:
        """One event at `step` holding a summary value (tag, plugin metadata, TensorProto) per entry."""
        values = [summary_pb2.Summary.Value(tag=k, metadata=metadata, tensor=t) for k, t in tensors.items()]
        summary = summary_pb2.Summary(value=values)
        self._writer.add_event(event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary))

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        tensors = {k: tensor_util.make_tensor_proto(np.float32(v)) for k, v in scalars.items()}
        self._write(step, tensors, _SCALARS)

    def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
        tensors = {}
        for k, batch in images.items():
            batch = np.asarray(batch)
            batch = batch[None] if batch.ndim == 3 else batch  # as clu's SummaryWriter
            if batch.dtype != np.uint8 or batch.ndim != 4:
                raise ValueError(f"image {k!r}: expected uint8 (K, H, W, C), got {batch.dtype} {batch.shape}")
            content = [str(batch.shape[2]).encode(), str(batch.shape[1]).encode()]
            for img in batch:
                png = io.BytesIO()
                Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(png, format="PNG")
                content.append(png.getvalue())
            tensors[k] = tensor_util.make_tensor_proto(content, dtype=types_pb2.DT_STRING)
        self._write(step, tensors, _IMAGES)

    def _unsupported(self, kind: str) -> None:
        if kind not in self._warned:
            self._warned.add(kind)
            logging.warning("TensorBoardWriter (no TensorFlow) does not write %s", kind)

    def write_summaries(self, step, values, metadata=None) -> None:
        self._unsupported("raw summaries")

    def write_videos(self, step, videos) -> None:
        self._unsupported("videos")

    def write_audios(self, step, audios, *, sample_rate) -> None:
        self._unsupported("audio")

    def write_texts(self, step, texts) -> None:
        self._unsupported("texts")

    def write_histograms(self, step, arrays, num_buckets=None) -> None:
        self._unsupported("histograms")

    def write_hparams(self, hparams) -> None:
        self._unsupported("hparams")

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


def _import_clu() -> tuple[types.ModuleType, types.ModuleType, types.ModuleType]:
    """clu's `metric_writers`, `parameter_overview`, `periodic_actions`; without TensorFlow, the one
    clu module importing it (`clu.metric_writers.summary_writer`) is stood in for by `TensorBoardWriter`."""
    try:
        import tensorflow  # noqa: F401  (what clu's SummaryWriter writes with)
    except ImportError:
        shim = types.ModuleType("clu.metric_writers.summary_writer", "stand-in: fewstep_jax.runs.writers")
        shim.SummaryWriter = TensorBoardWriter
        sys.modules.setdefault(shim.__name__, shim)
    from clu import metric_writers, parameter_overview, periodic_actions

    metric_writers.MetricWriter.register(TensorBoardWriter)
    return metric_writers, parameter_overview, periodic_actions


metric_writers, parameter_overview, periodic_actions = _import_clu()

METRICS_FILE = "metrics.jsonl"


class JsonlWriter(metric_writers.MetricWriter):
    """Appends one line {"step": step, name: value, ...} per `write_scalars` call; ignores
    everything else. Appends, so a resumed run continues the same file."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a")  # noqa: SIM115 (closed in close())

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        row = {"step": int(step), **{k: float(v) for k, v in scalars.items()}}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()

    def write_summaries(self, step, values, metadata=None) -> None:
        pass

    def write_images(self, step, images) -> None:
        pass

    def write_videos(self, step, videos) -> None:
        pass

    def write_audios(self, step, audios, *, sample_rate) -> None:
        pass

    def write_texts(self, step, texts) -> None:
        pass

    def write_histograms(self, step, arrays, num_buckets=None) -> None:
        pass

    def write_hparams(self, hparams) -> None:
        pass

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def make_writer(logdir: str | Path, *, is_main: bool) -> metric_writers.MetricWriter:
    """clu's default writer (TensorBoard + logging; logging only when not `is_main`) plus, on
    the main process, a metrics.jsonl in `logdir`. Call `flush()` / `close()` at the end."""
    default = metric_writers.create_default_writer(str(logdir), just_logging=not is_main)
    if not is_main:
        return default
    jsonl = metric_writers.AsyncWriter(JsonlWriter(Path(logdir) / METRICS_FILE))
    return metric_writers.MultiWriter([default, jsonl])


def read_metrics(logdir: str | Path) -> list[dict[str, float]]:
    """The rows of `<logdir>/metrics.jsonl` (empty if there is none)."""
    path = Path(logdir) / METRICS_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _format_secs(s: float) -> str:
    s = round(s)
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{sec:02d}s"


class ProgressReporter:
    """Call after every step: clu's ReportProgress (writes steps_per_sec / uptime to the writer)
    plus, every `every_steps` steps on the main process, one printed line
    `step 200/1000 | loss 0.0123 | 5.1 steps/s | ETA 2m37s`. `timed(name)` is clu's
    context manager that attributes wall time to a named part (e.g. "eval")."""

    def __init__(
        self,
        num_train_steps: int,
        writer: metric_writers.MetricWriter | None = None,
        *,
        every_steps: int = 100,
        is_main: bool = True,
        print_fn: Callable[[str], None] | None = None,
    ):
        if every_steps < 1:
            raise ValueError(f"every_steps={every_steps} must be >= 1")
        self.num_train_steps = num_train_steps
        self.every_steps = every_steps
        self.is_main = is_main
        self._print = print_fn or (lambda line: print(line, file=sys.stdout, flush=True))
        self._clu = periodic_actions.ReportProgress(
            num_train_steps=num_train_steps, writer=writer, every_steps=every_steps,
            every_secs=None,
        )  # fmt: skip
        self._last: tuple[int, float] | None = None

    def timed(self, name: str):
        return self._clu.timed(name)

    def __call__(self, step: int, metrics: Mapping[str, Any] | None = None) -> str | None:
        """Report after step `step` (1-based count of done steps); returns the printed line."""
        self._clu(step)
        now = time.monotonic()
        if self._last is None:  # the first call only starts the clock
            self._last = (step, now)
            return None
        if step % self.every_steps and step != self.num_train_steps:
            return None
        prev_step, prev_t = self._last
        self._last = (step, now)
        if not self.is_main or step == prev_step:
            return None
        rate = (step - prev_step) / max(now - prev_t, 1e-9)
        parts = [f"step {step}/{self.num_train_steps}"]
        if metrics and "loss" in metrics:
            parts.append(f"loss {float(metrics['loss']):.4g}")
        parts.append(f"{rate:.3g} steps/s")
        parts.append(f"ETA {_format_secs(max(self.num_train_steps - step, 0) / rate)}")
        line = " | ".join(parts)
        self._print(line)
        return line


def log_parameter_overview(params: Any, *, include_stats: bool = True) -> str:
    """Table of parameter names, shapes, sizes (and mean/std) plus the total; logged and
    returned. Stats are skipped for abstract (ShapeDtypeStruct) or multi-host sharded leaves."""
    leaves = jax.tree.leaves(params)
    if any(
        not isinstance(x, np.ndarray | jax.Array) or (isinstance(x, jax.Array) and not x.is_fully_addressable)
        for x in leaves
    ):
        include_stats = False
    text = parameter_overview.get_parameter_overview(params, include_stats=include_stats)
    logging.info("parameters:\n%s", text)
    return text


def image_grid(images: np.ndarray, ncols: int | None = None, pad: int = 1) -> np.ndarray:
    """(N, H, W, C) floats in [-1, 1] -> one (rows*(H+pad)+pad, ncols*(W+pad)+pad, C) uint8 grid."""
    images = np.asarray(images, dtype=np.float32)
    if images.ndim != 4:
        raise ValueError(f"image_grid expects NHWC images, got shape {images.shape}")
    n, h, w, c = images.shape
    ncols = ncols or math.ceil(math.sqrt(n))
    rows = math.ceil(n / ncols)
    u8 = np.round((np.clip(images, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)
    grid = np.zeros((rows * (h + pad) + pad, ncols * (w + pad) + pad, c), np.uint8)
    for i in range(n):
        r, col = divmod(i, ncols)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        grid[y : y + h, x : x + w] = u8[i]
    return grid


def write_images(writer: metric_writers.MetricWriter, step: int, images: Mapping[str, np.ndarray]) -> None:
    """Write each NHWC batch in [-1, 1] as one uint8 grid image (TensorBoard "images")."""
    grids = {}
    for name, batch in images.items():
        if np.ndim(batch) != 4:
            raise ValueError(f"write_images: {name!r} must be NHWC, got shape {np.shape(batch)}")
        grids[name] = image_grid(np.asarray(batch))[None]
    writer.write_images(step, grids)
