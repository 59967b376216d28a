"""Metric writers: TensorBoard event files + metrics.jsonl on the main process only."""

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from fewstep_jax.runs import writers


def test_main_writer_writes_tensorboard_and_jsonl(tmp_path):
    w = writers.make_writer(tmp_path, is_main=True)
    w.write_scalars(1, {"loss": np.float32(0.5), "lr": 1e-3})
    w.write_scalars(2, {"loss": 0.25})
    writers.write_images(w, 2, {"samples": np.linspace(-1, 1, 4 * 5 * 6 * 3).reshape(4, 5, 6, 3)})
    w.flush()
    w.close()
    assert list(tmp_path.glob("events.out.tfevents.*"))
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows == [{"step": 1, "loss": 0.5, "lr": 1e-3}, {"step": 2, "loss": 0.25}]
    assert writers.read_metrics(tmp_path) == rows


def test_non_main_writer_writes_nothing_to_disk(tmp_path):
    w = writers.make_writer(tmp_path / "logs", is_main=False)
    w.write_scalars(1, {"loss": 1.0})
    writers.write_images(w, 1, {"x": np.zeros((1, 2, 2, 1))})
    w.flush()
    w.close()
    assert not (tmp_path / "logs").exists() or not list((tmp_path / "logs").iterdir())
    assert writers.read_metrics(tmp_path / "logs") == []


def test_image_grid_layout_and_range():
    imgs = np.stack([np.full((2, 3, 1), v) for v in (-1.0, 0.0, 1.0, 2.0, -5.0)])
    grid = writers.image_grid(imgs, pad=1)
    # 5 images -> 3 columns x 2 rows of (2, 3) tiles with 1-pixel borders.
    assert grid.shape == (2 * 3 + 1, 3 * 4 + 1, 1) and grid.dtype == np.uint8
    assert grid[1, 1, 0] == 0 and grid[1, 5, 0] == 128 and grid[1, 9, 0] == 255
    assert grid[4, 1, 0] == 255 and grid[4, 5, 0] == 0  # clipped to [-1, 1]
    assert grid[0].max() == 0  # border
    with pytest.raises(ValueError, match=r"'x' must be NHWC, got shape \(2, 2\)"):
        writers.write_images(None, 0, {"x": np.zeros((2, 2))})


def test_progress_reporter_prints_every_n_steps_on_main_only():
    lines = []
    p = writers.ProgressReporter(10, every_steps=4, print_fn=lines.append)
    for step in range(1, 11):
        p(step, {"loss": 0.5 / step})
    assert [ln.split(" | ")[0] for ln in lines] == ["step 4/10", "step 8/10", "step 10/10"]
    assert "loss 0.0625" in lines[1] and "steps/s" in lines[1] and "ETA" in lines[1]
    quiet = []
    q = writers.ProgressReporter(10, every_steps=2, is_main=False, print_fn=quiet.append)
    for step in range(1, 11):
        q(step, {"loss": 1.0})
    assert quiet == []


def test_parameter_overview_lists_shapes_and_total():
    text = writers.log_parameter_overview({"dense": {"kernel": np.ones((3, 4), np.float32)}})
    assert "dense/kernel" in text and "(3, 4)" in text and "Total: 12" in text


def test_eval_images_go_to_tensorboard(tmp_path):
    """The loop's eval writer: scalars as eval/..., NHWC batches under images/ as image grids."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from fewstep_jax.train.loop import write_eval

    w = writers.make_writer(str(tmp_path), is_main=True)
    imgs = np.linspace(-1, 1, 4 * 8 * 8).reshape(4, 8, 8, 1).astype(np.float32)
    scalars = write_eval(w, 3, {"fd": 1.5, "images/euler_nfe4": imgs})
    w.flush()
    assert scalars == {"fd": 1.5}
    acc = EventAccumulator(str(tmp_path), size_guidance={"images": 0, "tensors": 0}).Reload()
    tags = acc.Tags()
    assert any("samples/euler_nfe4" in t for t in tags.get("images", []) + tags.get("tensors", [])), tags
    assert any("eval/fd" in t for t in tags.get("scalars", []) + tags.get("tensors", [])), tags


# A machine without TensorFlow, simulated: a None entry in sys.modules makes `import tensorflow`
# raise ModuleNotFoundError and `importlib.util.find_spec("tensorflow")` return None (etils and
# tensorboard probe it so), exactly as when the package is not installed. Run before any import.
WITHOUT_TENSORFLOW = 'import sys; sys.modules.update(dict.fromkeys(("tensorflow", "tensorflow_datasets")))'


def _event_values(logdir) -> list[tuple[int, str, str, object]]:
    """(step, tag, plugin, value) of every summary value in `logdir`'s one event file, read with
    tensorboard's own loader: scalars as float32, images as their decoded PNGs (uint8 arrays)."""
    from PIL import Image
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.util import tensor_util

    (path,) = logdir.glob("events.out.tfevents.*")
    out = []
    for event in EventFileLoader(str(path)).Load():
        for v in event.summary.value:
            value = tensor_util.make_ndarray(v.tensor)
            plugin = v.metadata.plugin_data.plugin_name
            if plugin == "images":  # [width, height, png...]
                value = (*map(int, value[:2]), *(np.asarray(Image.open(io.BytesIO(p))) for p in value[2:]))
            out.append((event.step, v.tag, plugin, value))
    return out


def test_tf_free_tensorboard_writer_writes_what_tf_summary_writes(tmp_path):
    """Same scalars and images through clu's tf.summary writer and through `TensorBoardWriter`:
    the same (step, tag, plugin, float32 value / decoded pixels) in both event files."""
    pytest.importorskip("tensorflow")
    from clu.metric_writers.tf.summary_writer import SummaryWriter

    rgb = writers.image_grid(np.linspace(-1, 1, 4 * 5 * 6 * 3).reshape(4, 5, 6, 3))[None]
    grey = writers.image_grid(np.linspace(-1, 1, 2 * 3 * 3).reshape(2, 3, 3, 1))[None]
    for name, cls in (("tf", SummaryWriter), ("tf_free", writers.TensorBoardWriter)):
        w = cls(str(tmp_path / name))
        w.write_scalars(1, {"loss": np.float32(0.5), "lr": 1e-3})
        w.write_scalars(7, {"loss": 0.25})
        w.write_images(7, {"samples/rgb": rgb, "samples/grey": grey})
        w.close()
    tf_rows, free_rows = _event_values(tmp_path / "tf"), _event_values(tmp_path / "tf_free")
    assert [r[:3] for r in free_rows] == [r[:3] for r in tf_rows] == [
        (1, "loss", "scalars"), (1, "lr", "scalars"), (7, "loss", "scalars"),
        (7, "samples/rgb", "images"), (7, "samples/grey", "images"),
    ]  # fmt: skip
    for (*_, a), (*_, b) in zip(tf_rows[:3], free_rows[:3], strict=True):
        assert a.dtype == b.dtype == np.float32 and a == b
    for (*_, a), (*_, b), grid in zip(tf_rows[3:], free_rows[3:], (rgb, grey), strict=True):
        assert a[:2] == b[:2] == (grid.shape[2], grid.shape[1])  # width, height
        np.testing.assert_array_equal(b[2].reshape(grid.shape[1:]), grid[0])
        np.testing.assert_array_equal(a[2], b[2])


def test_training_without_tensorflow_writes_metrics_and_tensorboard(tmp_path):
    """A teacher run on a machine without TensorFlow (subprocess): metrics.jsonl plus an event
    file tensorboard reads back with the same losses; TFDS reading names what to install."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.util import tensor_util

    from fewstep_jax.data.tfds_source import TFDS_INSTALL_HINT

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    workdir = tmp_path / "run"
    script = f"""{WITHOUT_TENSORFLOW}
from fewstep_jax.main import run
sys.argv = ["fewstep", "--config={root}/configs/gmm8_teacher.py", "--workdir={workdir}",
    "--config.train.num_steps=20", "--config.train.log_every=10", "--config.eval.train_nfes=(1,)",
    "--config.eval.train_solvers=('euler',)", "--config.eval.train_num_samples=200"]
try:
    run()
except SystemExit as e:
    assert not e.code, e.code
print("TF_LOADED", sorted(m for m, mod in sys.modules.items() if m.startswith("tensorflow") and mod))
from fewstep_jax.data import load_dataset
try:
    load_dataset("tfds:cifar10")
except ImportError as e:
    print("HINT", repr(str(e)))
"""
    env = dict(os.environ, XLA_FLAGS="", TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "TF_LOADED []" in proc.stdout, proc.stdout
    assert f"HINT {TFDS_INSTALL_HINT!r}" in proc.stdout and "\n" not in TFDS_INSTALL_HINT
    assert 'pip install "fewstep-jax[tfds]"' in TFDS_INSTALL_HINT

    losses = {r["step"]: r["loss"] for r in writers.read_metrics(workdir) if "loss" in r}
    assert sorted(losses) == [10, 20]
    assert any("eval/euler_nfe1/sw2" in r for r in writers.read_metrics(workdir))
    assert len(list(workdir.glob("events.out.tfevents.*"))) == 1
    acc = EventAccumulator(str(workdir), size_guidance={"tensors": 0}).Reload()
    assert {"loss", "steps_per_sec", "eval/euler_nfe1/sw2"} <= set(acc.Tags()["tensors"])
    logged = {e.step: float(tensor_util.make_ndarray(e.tensor_proto)) for e in acc.Tensors("loss")}
    assert logged == {s: float(np.float32(v)) for s, v in losses.items()}
